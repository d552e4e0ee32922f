//! One shard of the store: a hash table of slot numbers into a slab of entries (8-byte pointers
//! to their blocks, see `entry.rs`), threaded on intrusive queues (the "lru" policy uses one,
//! kept in recency order; S3-FIFO uses two, see `s3fifo.rs`). An entry keeps its key and, for a
//! small immutable value, the value's bytes in its block; it keeps no hash.
//!
//! Expiry costs no memory per entry: there is no index of deadlines. A sweep cursor walks the slab
//! (contiguous: each slot checked costs one read of its entry's header, where the deadline is) a
//! bounded number of slots at a time (`pop_swept`, driven by the store's writes), removing the
//! expired entries it passes, and wraps around. The shard keeps a lower bound of its entries'
//! deadlines (`earliest`), lowered by every deadline put in and raised to the least deadline the
//! sweep saw when it completes a pass, so that sweeping costs nothing while no entry can have
//! expired. Reads never depend on it: each checks its entry's exact deadline.
//!
//! The table grows incrementally (as Redis's dict does): when it is full, a table of twice the
//! capacity takes over and the full one is kept as `old`; each later insert or removal copies the
//! entries of the next `MIGRATE_STEP` slots of the slab into the new table, and lookups probe
//! both until the cursor has passed the whole slab. No insert rehashes the whole table
//! (rehashing reads every entry's key from its block, a cache miss an entry: ~25 ms for a
//! 229,376-entry shard in one insert).
//!
//! Nothing here locks or allocates Python objects: the store wraps each shard in a lock and drops
//! what a shard hands back only after unlocking.

use ahash::RandomState;
use hashbrown::HashTable;

use crate::clock::NEVER;
pub use crate::entry::{Entry, Queue};
use crate::ghost::Ghost;
use crate::stored_key::StoredKey;
use crate::tinylfu::TinyLfu;

const NIL: u32 = u32::MAX;

/// The heaviest entry a shard holds (charges are kept in 32 bits where they cannot be derived):
/// 4 GiB. The store refuses heavier ones as too large, whatever `MAX_BYTES` says.
pub const MAX_WEIGHT: u64 = u32::MAX as u64;

/// Both ends and the length of one intrusive queue.
#[derive(Clone, Copy)]
struct Ends {
    head: u32,
    tail: u32,
    len: usize,
}

const EMPTY: Ends = Ends {
    head: NIL,
    tail: NIL,
    len: 0,
};

/// Slots whose entries one insert or removal copies from the old table to the new one while the
/// table grows (it reads each copied entry's key: a cache miss). Any step of at least one slot
/// finishes in time (see `grow_if_full`); 64 keeps a step to a few microseconds.
pub const MIGRATE_STEP: u32 = 64;

/// Bytes one entry takes in a shard's slab: a pointer (a tagged entry's generation is in its
/// block, `Entry::gen`; an untagged one has none, see `writes`).
pub const SLOT_SIZE: usize = std::mem::size_of::<Option<Entry<()>>>();

pub struct Shard<V> {
    /// The store's hasher: entries do not keep their hash; it is computed again from the key
    /// when the table grows or an entry leaves.
    hasher: RandomState,
    /// The index: slot numbers, found by their key's hash. Inserts go here.
    table: HashTable<u32>,
    /// While the table grows, the full table it replaces (empty and unallocated otherwise).
    /// Entries are copied out, not removed, and an entry removed while in it stays: such stale
    /// cells never match, as `find` compares the key at the cell's slot, and an entry's live
    /// cell is in `table` once it is there. It is dropped whole when the growth ends.
    old: HashTable<u32>,
    /// The next slot whose entry is copied into `table`, and the slab's length when the growth
    /// began (every entry in `old` has a slot below it). Growing while `cursor < migrate_end`.
    cursor: u32,
    migrate_end: u32,
    /// While growing, a bit per slot below `migrate_end`: set when the entry put at that slot
    /// after the growth began is in `table` already. An entry at a slot in
    /// `cursor..migrate_end` without its bit is only in `old`; every other entry is in `table`.
    in_new: Vec<u64>,
    /// Entries copied between tables so far (tests check the bound per operation).
    #[cfg(test)]
    moved: usize,
    slots: Vec<Option<Entry<V>>>,
    /// Writes so far: bumped by every insert, removal and swap, and by the store for each
    /// in-place change of a value (`note_write`), under the shard's write lock. Unchanged
    /// between two reads under the lock, it proves that no entry of the shard was stored,
    /// removed or changed in between (`Store::snapshot` of an untagged entry, which has no
    /// generation). Kept through `drain`, never reset.
    writes: u64,
    /// Free slot numbers, the most recently freed last.
    free: Vec<u32>,
    queues: [Ends; 2],
    /// Hashes of keys recently evicted from the small queue (S3-FIFO only).
    pub(crate) ghost: Ghost,
    /// The frequency sketch and window climber (W-TinyLFU only; empty otherwise).
    pub(crate) tiny: TinyLfu,
    /// The next slot the expiry sweep checks (see `pop_swept`).
    sweep: u32,
    /// No entry of the shard expires before `earliest` (`NEVER` when none has a deadline): every
    /// deadline put in lowers it; the sweep raises it to `pass_min` each time it wraps around.
    earliest: u64,
    /// A lower bound of the deadlines of the entries at slots below `sweep` (those the sweep
    /// passed in this pass, and those put in since: every deadline put in lowers it too).
    pass_min: u64,
    /// Entries that have a deadline.
    timed: usize,
    len: usize,
}

impl<V> Default for Shard<V> {
    fn default() -> Self {
        Shard::with_hasher(RandomState::new())
    }
}

impl<V> Shard<V> {
    /// An empty shard hashing keys with `hasher` (the store's, so that its hashes fit).
    pub fn with_hasher(hasher: RandomState) -> Self {
        Shard {
            hasher,
            table: HashTable::new(),
            old: HashTable::new(),
            cursor: 0,
            migrate_end: 0,
            in_new: Vec::new(),
            #[cfg(test)]
            moved: 0,
            slots: Vec::new(),
            writes: 0,
            free: Vec::new(),
            queues: [EMPTY; 2],
            ghost: Ghost::default(),
            tiny: TinyLfu::default(),
            sweep: 0,
            earliest: NEVER,
            pass_min: NEVER,
            timed: 0,
            len: 0,
        }
    }

    /// The hash of `key` (a whole key or an entry's `key()`) under this shard's hasher.
    #[inline]
    pub fn hash<'k>(&self, key: impl Into<StoredKey<'k>>) -> u64 {
        key.into().hash_with(&self.hasher)
    }
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    #[inline]
    pub fn entry(&self, slot: u32) -> &Entry<V> {
        match &self.slots[slot as usize] {
            Some(e) => e,
            None => unreachable!("slot {slot} is free"),
        }
    }

    #[inline]
    pub fn entry_mut(&mut self, slot: u32) -> &mut Entry<V> {
        match &mut self.slots[slot as usize] {
            Some(e) => e,
            None => unreachable!("slot {slot} is free"),
        }
    }

    /// The entry at `slot` if it is in use, tagged, and carries generation `gen` (see
    /// `Entry::gen`: only tagged entries are referred to by slot and generation).
    pub fn entry_if(&self, slot: u32, gen: u32) -> Option<&Entry<V>> {
        match self.slots.get(slot as usize) {
            Some(Some(e)) if e.gen() == Some(gen) => Some(e),
            _ => None,
        }
    }

    /// The shard's write counter (see `writes`).
    #[inline]
    pub fn writes(&self) -> u64 {
        self.writes
    }

    /// Counts a change of an entry's value made in place (through `entry_mut`).
    #[inline]
    pub fn note_write(&mut self) {
        self.writes += 1;
    }

    /// The slot of `key` (whose hash is `hash`), in the table or, while it grows, the old one.
    /// Reads only: correct under a shared lock at any point of a growth.
    #[inline]
    pub fn find(&self, hash: u64, key: &str) -> Option<u32> {
        let slots = &self.slots;
        let key = StoredKey::of(key);
        let eq = |&s: &u32| match &slots[s as usize] {
            Some(e) => e.key() == key,
            None => false,
        };
        match self.table.find(hash, eq) {
            Some(&s) => Some(s),
            None if self.growing() => self.old.find(hash, eq).copied(),
            None => None,
        }
    }

    /// Whether the table is growing (entries may remain only in the old table).
    #[inline]
    pub fn growing(&self) -> bool {
        self.cursor < self.migrate_end
    }

    /// Whether the entry at `slot` is only in the old table.
    #[inline]
    fn only_in_old(&self, slot: u32) -> bool {
        (self.cursor..self.migrate_end).contains(&slot)
            && self.in_new[slot as usize / 64] & (1 << (slot % 64)) == 0
    }

    /// Starts a growth when the table has no room left, so that hashbrown never resizes or
    /// rehashes in place (either reads every entry's key) inside an insert: a new table takes the
    /// inserts and the full one becomes `old`, copied out `MIGRATE_STEP` slots per insert or
    /// removal. hashbrown's room (`capacity() - len()`, its `growth_left`) also runs out when
    /// removals leave tombstones; then the new table is sized for the live entries, which is an
    /// incremental form of hashbrown's rehash in place.
    ///
    /// Why it finishes in time. Let `n` be the entries (all in the full table) and `end` the
    /// slab's length now: entries are copied from slots below `end` only, so the growth is over
    /// after `ceil(end / MIGRATE_STEP)` inserts or removals. The new table's room drops by one
    /// per entry copied (at most `n` in all: each slot is visited once, and entries put after
    /// the growth began are skipped) and per insert, and never for a removal. Sized for
    /// `n + ceil(end / MIGRATE_STEP)` entries (and at least twice `n`, so that it doubles), it
    /// has room for every copy and every insert until the growth ends: no growth starts while
    /// one runs (asserted below) and no entry is copied into a table without room.
    #[inline]
    fn grow_if_full(&mut self) {
        if self.table.len() < self.table.capacity() {
            return;
        }
        if self.growing() {
            // Unreachable by the argument above; finish the growth rather than let hashbrown
            // resize.
            debug_assert!(false, "the table filled before its growth finished");
            while self.growing() {
                self.migrate(u32::MAX);
            }
        }
        let n = self.table.len();
        let end = self.slots.len();
        let size = (2 * n).max(n + end.div_ceil(MIGRATE_STEP as usize)).max(4);
        let new = HashTable::with_capacity(size);
        let old = std::mem::replace(&mut self.table, new);
        if !old.is_empty() {
            self.old = old;
            self.cursor = 0;
            self.migrate_end = end as u32;
            self.in_new = vec![0; end.div_ceil(64)];
        }
    }

    /// Copies the entries of up to `step` slots from the old table to the new one; drops the
    /// old table once the cursor has passed every slot it can hold.
    #[inline]
    fn migrate(&mut self, step: u32) {
        if !self.growing() {
            return;
        }
        let stop = self.cursor.saturating_add(step).min(self.migrate_end);
        let (slots, hasher) = (&self.slots, &self.hasher);
        let rehash = |&s: &u32| match &slots[s as usize] {
            Some(e) => e.key().hash_with(hasher),
            None => 0,
        };
        for slot in self.cursor..stop {
            if self.in_new[slot as usize / 64] & (1 << (slot % 64)) != 0 {
                continue;
            }
            if let Some(e) = &slots[slot as usize] {
                debug_assert!(self.table.len() < self.table.capacity());
                self.table
                    .insert_unique(e.key().hash_with(hasher), slot, rehash);
                #[cfg(test)]
                {
                    self.moved += 1;
                }
            }
        }
        self.cursor = stop;
        if stop == self.migrate_end {
            self.old = HashTable::new();
            self.in_new = Vec::new();
            self.cursor = 0;
            self.migrate_end = 0;
        }
    }

    /// Stores a new entry whose key hashes to `hash` (the key must not be present) at the most
    /// recent end; returns its slot.
    pub fn insert(&mut self, entry: Entry<V>, hash: u64) -> u32 {
        self.insert_in(entry, hash, Queue::Main)
    }

    /// Stores a new entry whose key hashes to `hash` (the key must not be present) at the back of
    /// `queue`; returns its slot.
    pub fn insert_in(&mut self, entry: Entry<V>, hash: u64, queue: Queue) -> u32 {
        debug_assert_eq!(hash, self.hash(entry.key()));
        self.migrate(MIGRATE_STEP);
        self.grow_if_full();
        let expires = entry.expires();
        let slot = match self.free.pop() {
            Some(slot) => {
                self.slots[slot as usize] = Some(entry);
                slot
            }
            None => {
                assert!(self.slots.len() < NIL as usize, "shard is full");
                self.slots.push(Some(entry));
                (self.slots.len() - 1) as u32
            }
        };
        self.writes += 1;
        self.link_back(slot, queue);
        if slot < self.migrate_end {
            self.in_new[slot as usize / 64] |= 1 << (slot % 64);
        }
        let (slots, hasher) = (&self.slots, &self.hasher);
        self.table
            .insert_unique(hash, slot, |&s| match &slots[s as usize] {
                Some(e) => e.key().hash_with(hasher),
                None => 0,
            });
        self.note_deadline(expires);
        self.len += 1;
        slot
    }

    /// Unlinks and returns the entry at `slot`.
    pub fn remove(&mut self, slot: u32) -> Entry<V> {
        let hash = self.hash(self.entry(slot).key());
        self.remove_hashed(slot, hash)
    }

    /// `remove` for a caller that has the key's hash already.
    pub fn remove_hashed(&mut self, slot: u32, hash: u64) -> Entry<V> {
        let expires = self.entry(slot).expires();
        self.unlink(slot);
        self.forget_deadline(expires);
        // An entry only in the old table leaves its cell there (stale, see `old`).
        if !self.only_in_old(slot) {
            match self.table.find_entry(hash, |&s| s == slot) {
                Ok(found) => {
                    found.remove();
                }
                Err(_) => debug_assert!(false, "slot {slot} is in neither table"),
            }
        }
        let old = self.slots[slot as usize].take();
        self.free.push(slot);
        self.writes += 1;
        self.len -= 1;
        self.migrate(MIGRATE_STEP);
        old.expect("a removed slot was in use")
    }

    /// Replaces the entry at `slot` by `f(entry)`, which keeps its key and its place in the
    /// queues (its links: see `Entry::reshaped`); a new deadline lowers the shard's bound. `f`
    /// keeps the value, so this is no write (`writes`), though the block may move.
    pub fn replace_with(&mut self, slot: u32, f: impl FnOnce(Entry<V>) -> Entry<V>) {
        let old = self.slots[slot as usize]
            .take()
            .expect("a replaced slot is in use");
        let before = old.expires();
        let new = f(old);
        let after = new.expires();
        self.slots[slot as usize] = Some(new);
        if before != after {
            self.forget_deadline(before);
            self.note_deadline(after);
        }
    }

    /// Puts `new` (made by `Entry::with_value` from the entry at `slot`) in its place and returns
    /// the old entry.
    pub fn swap(&mut self, slot: u32, new: Entry<V>) -> Entry<V> {
        debug_assert_eq!(new.key(), self.entry(slot).key());
        debug_assert_eq!(new.expires(), self.entry(slot).expires());
        self.writes += 1;
        self.slots[slot as usize]
            .replace(new)
            .expect("a swapped slot is in use")
    }

    /// Marks `slot` as the most recently used (the back of its queue).
    #[inline]
    pub fn touch(&mut self, slot: u32) {
        let queue = self.entry(slot).queue();
        if self.queues[queue as usize].tail != slot {
            self.move_to_back(slot, queue);
        }
    }

    /// Moves `slot` to the back of `queue` (possibly another queue than its own).
    pub fn move_to_back(&mut self, slot: u32, queue: Queue) {
        self.unlink(slot);
        self.link_back(slot, queue);
    }

    /// The slot at the front (the oldest end) of `queue`.
    #[inline]
    pub fn front(&self, queue: Queue) -> Option<u32> {
        let head = self.queues[queue as usize].head;
        (head != NIL).then_some(head)
    }

    /// How many entries are threaded on `queue`.
    #[inline]
    pub fn queue_len(&self, queue: Queue) -> usize {
        self.queues[queue as usize].len
    }

    /// Gives the entry at `slot` a new deadline (in a new block if the deadline needs the
    /// tail's far field, or leaves it).
    pub fn set_expiry(&mut self, slot: u32, expires: u64) {
        self.replace_with(slot, |e| {
            let (delta, weight) = (e.delta(), e.fixed_weight());
            e.reshaped(expires, delta, weight.map(|w| w as u32))
        });
    }

    pub fn pop_oldest(&mut self) -> Option<Entry<V>> {
        self.front(Queue::Main).map(|s| self.remove(s))
    }

    /// Whether an entry of the shard may have expired by `now` (false: none has, for sure).
    #[inline]
    pub fn may_have_expired(&self, now: u64) -> bool {
        self.earliest <= now
    }

    /// Moves the sweep cursor on, one slot per unit of `budget`, until it passes an entry
    /// expired by `now`, which it removes and returns; `None` once `budget` is spent or no entry
    /// can have expired (then it costs nothing). Each slot checked reads its entry's deadline
    /// (one header read); an expired entry is removed whatever queue it is in. On wrapping around
    /// the slab, the least deadline seen in the pass becomes the shard's bound (`earliest`).
    pub fn pop_swept(&mut self, now: u64, budget: &mut u32) -> Option<Entry<V>> {
        while *budget > 0 {
            if self.earliest > now {
                return None;
            }
            if self.sweep as usize >= self.slots.len() {
                // A whole pass: every entry left was passed (or put in since) and lowered
                // `pass_min` to at most its deadline.
                self.earliest = self.pass_min;
                self.pass_min = NEVER;
                self.sweep = 0;
                if self.slots.is_empty() || self.earliest > now {
                    return None;
                }
            }
            let slot = self.sweep;
            self.sweep += 1;
            *budget -= 1;
            if let Some(e) = &self.slots[slot as usize] {
                let expires = e.expires();
                if expires <= now {
                    return Some(self.remove(slot));
                }
                self.pass_min = self.pass_min.min(expires);
            }
        }
        None
    }

    /// Removes every entry expired by `now` (a scan of the whole slab: for Django's cull, which
    /// is O(n) anyway) and tightens the shard's bound to the least deadline left.
    pub fn expire_all(&mut self, now: u64, out: &mut Vec<Entry<V>>) {
        if !self.may_have_expired(now) {
            return;
        }
        let mut least = NEVER;
        for slot in 0..self.slots.len() as u32 {
            if let Some(e) = &self.slots[slot as usize] {
                let expires = e.expires();
                if expires <= now {
                    out.push(self.remove(slot));
                } else {
                    least = least.min(expires);
                }
            }
        }
        self.earliest = least;
        self.pass_min = least;
    }

    /// Every entry, in slot order.
    pub fn iter(&self) -> impl Iterator<Item = &Entry<V>> {
        self.slots.iter().flatten()
    }

    /// Takes every entry out, leaving the shard empty.
    pub fn drain(&mut self) -> Vec<Entry<V>> {
        let slots = std::mem::take(&mut self.slots);
        let writes = self.writes + 1;
        *self = Shard::with_hasher(self.hasher.clone());
        self.writes = writes;
        slots.into_iter().flatten().collect()
    }

    fn unlink(&mut self, slot: u32) {
        let e = self.entry(slot);
        let ((prev, next), q) = (e.links(), e.queue() as usize);
        if prev != NIL {
            self.entry_mut(prev).set_next(next);
        } else {
            self.queues[q].head = next;
        }
        if next != NIL {
            self.entry_mut(next).set_prev(prev);
        } else {
            self.queues[q].tail = prev;
        }
        self.queues[q].len -= 1;
    }

    fn link_back(&mut self, slot: u32, queue: Queue) {
        let q = queue as usize;
        let tail = self.queues[q].tail;
        {
            let e = self.entry_mut(slot);
            e.set_queue(queue);
            e.set_prev(tail);
            e.set_next(NIL);
        }
        if tail != NIL {
            self.entry_mut(tail).set_next(slot);
        } else {
            self.queues[q].head = slot;
        }
        self.queues[q].tail = slot;
        self.queues[q].len += 1;
    }

    /// Counts an entry with deadline `expires` coming in (or an entry given it).
    #[inline]
    fn note_deadline(&mut self, expires: u64) {
        if expires != NEVER {
            self.timed += 1;
            self.earliest = self.earliest.min(expires);
            self.pass_min = self.pass_min.min(expires);
        }
    }

    /// Counts an entry with deadline `expires` leaving (or giving it up); with no deadline left
    /// in the shard, the bound is `NEVER` again.
    #[inline]
    fn forget_deadline(&mut self, expires: u64) {
        if expires != NEVER {
            debug_assert!(self.timed > 0, "a deadline forgotten twice");
            self.timed = self.timed.saturating_sub(1);
            if self.timed == 0 {
                self.earliest = NEVER;
                self.pass_min = NEVER;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::testing::Rng;
    use std::collections::HashMap;

    /// A millisecond and a second, in clock nanoseconds (the deadlines entries keep).
    const MS: u64 = 1_000_000;
    const SEC: u64 = 1_000_000_000;

    fn entry(key: &str, expires: u64) -> Entry<u32> {
        Entry::new(key, 1, expires, Vec::new())
    }

    /// Inserts `key` at the recent end of `s`.
    fn put(s: &mut Shard<u32>, key: &str, expires: u64) -> u32 {
        let hash = s.hash(key);
        s.insert(entry(key, expires), hash)
    }

    #[test]
    fn a_slot_is_a_pointer() {
        assert_eq!(SLOT_SIZE, 8);
        assert_eq!(std::mem::size_of::<Option<Entry<u32>>>(), 8);
    }

    // (A tag table takes a random hasher, which under `shuttle` works only inside a model.)
    #[cfg(not(feature = "shuttle"))]
    fn tagged(table: &crate::tags::TagTable, key: &str) -> Entry<u32> {
        Entry::new(key, 1, NEVER, table.stamps(["t"]))
    }

    #[cfg(not(feature = "shuttle"))]
    #[test]
    fn a_generation_belongs_to_its_entry_and_no_later_one_at_the_same_slot() {
        let table = crate::tags::TagTable::default();
        let mut s: Shard<u32> = Shard::default();
        let hash = s.hash("a");
        let a = s.insert(tagged(&table, "a"), hash);
        assert_eq!(s.entry(a).gen(), Some(0));
        s.entry_mut(a).set_gen(7);
        assert!(s.entry_if(a, 7).is_some_and(|e| e.key() == "a"));
        assert!(s.entry_if(a, 6).is_none());
        assert!(s.entry_if(a + 1, 0).is_none(), "no such slot");
        // A new deadline (a new block) keeps the entry's generation.
        s.set_expiry(a, 60 * 86_400 * SEC);
        assert!(s.entry_if(a, 7).is_some());
        // Once the entry leaves, its generation finds nothing, nor in the next entries at the
        // same slot: a tagged one (generation 0 until set, then another) or an untagged one
        // (none at all).
        drop(s.remove(a));
        assert!(s.entry_if(a, 7).is_none());
        let hash = s.hash("b");
        let b = s.insert(tagged(&table, "b"), hash);
        assert_eq!(b, a);
        assert!(s.entry_if(b, 7).is_none());
        s.entry_mut(b).set_gen(8);
        assert!(s.entry_if(b, 7).is_none());
        assert!(s.entry_if(b, 8).is_some_and(|e| e.key() == "b"));
        drop(s.remove(b));
        let c = put(&mut s, "c", NEVER);
        assert_eq!(c, a);
        s.entry_mut(c).set_gen(7);
        for gen in [0, 7, 8] {
            assert!(
                s.entry_if(c, gen).is_none(),
                "an untagged entry has no generation"
            );
        }
    }

    #[test]
    fn the_write_counter_moves_on_every_write_and_survives_a_drain() {
        let mut s: Shard<u32> = Shard::default();
        let mut last = s.writes();
        let mut moved = |s: &Shard<u32>| {
            let now = s.writes();
            let out = now > last;
            last = now;
            out
        };
        let a = put(&mut s, "a", NEVER);
        assert!(moved(&s), "insert");
        s.entry_mut(a).set_queue(Queue::Main);
        s.set_expiry(a, 5 * SEC);
        s.touch(a);
        assert!(!moved(&s), "a new deadline or a touch keeps the value");
        s.note_write();
        assert!(moved(&s), "in-place change");
        let mut new = entry("a", 5 * SEC);
        new.take_place_of(s.entry(a));
        drop(s.swap(a, new));
        assert!(moved(&s), "swap");
        drop(s.remove(a));
        assert!(moved(&s), "remove");
        put(&mut s, "b", 1);
        moved(&s);
        let mut budget = 10;
        assert!(s.pop_swept(2, &mut budget).is_some());
        assert!(moved(&s), "expiry");
        put(&mut s, "c", NEVER);
        moved(&s);
        assert_eq!(s.drain().len(), 1);
        assert!(moved(&s), "a drain neither keeps nor resets the count");
    }

    #[test]
    fn keys_that_differ_only_by_the_elided_prefix_are_distinct_entries_through_growth() {
        let mut s: Shard<u32> = Shard::default();
        let near = [
            "", ":1:", ":1", ":10:", "abc", ":1:abc", ":10:abc", ":1:1:abc", "1:abc",
        ];
        let mut slots = std::collections::HashMap::new();
        // Enough other keys that the table grows several times while these are in it.
        for i in 0..3_000 {
            for k in near {
                if i == 0 {
                    slots.insert(k.to_string(), put(&mut s, k, NEVER));
                }
            }
            put(&mut s, &format!(":1:k{i}"), NEVER);
            put(&mut s, &format!("k{i}"), NEVER);
            for (k, &slot) in &slots {
                assert_eq!(s.find(s.hash(k.as_str()), k), Some(slot), "{k:?} at {i}");
                assert_eq!(s.entry(slot).key(), k.as_str());
            }
        }
        assert_eq!(s.len(), near.len() + 6_000);
        for i in 0..3_000 {
            let (m, p) = (format!(":1:k{i}"), format!("k{i}"));
            let (ms, ps) = (s.find(s.hash(&m), &m), s.find(s.hash(&p), &p));
            assert!(ms.is_some() && ps.is_some() && ms != ps, "{i}");
        }
        // Removing one of each pair leaves the other.
        for k in near.iter().step_by(2) {
            let slot = slots[*k];
            assert_eq!(s.remove(slot).key().to_string(), *k);
        }
        for (n, k) in near.iter().enumerate() {
            assert_eq!(s.find(s.hash(*k), k).is_some(), n % 2 == 1, "{k:?}");
        }
    }

    #[test]
    fn insert_find_remove_reuses_slots() {
        let mut s: Shard<u32> = Shard::default();
        let a = put(&mut s, "a", NEVER);
        let b = put(&mut s, "b", NEVER);
        assert_eq!(s.find(s.hash("a"), "a"), Some(a));
        assert_eq!(s.find(s.hash("b"), "b"), Some(b));
        assert_eq!(s.find(s.hash("c"), "c"), None);
        assert_eq!(s.remove(a).key(), "a");
        assert_eq!(s.find(s.hash("a"), "a"), None);
        let c = put(&mut s, "c", NEVER);
        assert_eq!(c, a, "freed slot is reused");
        assert_eq!(s.len(), 2);
    }

    #[test]
    fn keys_are_found_after_the_table_grows_and_shrinks_without_stored_hashes() {
        let mut s: Shard<u32> = Shard::default();
        let slots: Vec<u32> = (0..5_000)
            .map(|i| put(&mut s, &format!("key-{i}"), NEVER))
            .collect();
        for i in (0..5_000).step_by(2) {
            let k = format!("key-{i}");
            assert_eq!(s.remove(slots[i]).key(), k);
        }
        for i in 0..5_000 {
            let k = format!("key-{i}");
            let found = s.find(s.hash(&k), &k);
            assert_eq!(found.is_some(), i % 2 == 1, "{k}");
        }
        assert_eq!(s.len(), 2_500);
    }

    #[test]
    fn lru_order_follows_touches() {
        let mut s: Shard<u32> = Shard::default();
        let slots: Vec<u32> = (0..4)
            .map(|i| put(&mut s, &format!("k{i}"), NEVER))
            .collect();
        s.touch(slots[0]);
        s.touch(slots[2]);
        let order: Vec<String> = std::iter::from_fn(|| s.pop_oldest())
            .map(|e| e.key().to_string())
            .collect();
        assert_eq!(order, ["k1", "k3", "k0", "k2"]);
        assert!(s.is_empty());
    }

    /// Sweeps `s` at `now` with budgets of `step` slots until a call finds nothing: the keys
    /// removed, in the order the sweep found them.
    fn sweep_all(s: &mut Shard<u32>, now: u64, step: u32) -> Vec<String> {
        let mut out = Vec::new();
        for _ in 0..=s.slots.len() + 1 {
            let mut budget = step;
            while let Some(e) = s.pop_swept(now, &mut budget) {
                out.push(e.key().to_string());
            }
        }
        out
    }

    #[test]
    fn the_sweep_removes_expired_entries_and_tracks_changed_deadlines() {
        let mut s: Shard<u32> = Shard::default();
        let a = put(&mut s, "a", 50 * SEC);
        put(&mut s, "b", 20 * SEC);
        put(&mut s, "c", NEVER);
        assert!(!s.may_have_expired(19 * SEC));
        assert!(sweep_all(&mut s, 10 * SEC, 4).is_empty());
        assert_eq!(sweep_all(&mut s, 30 * SEC, 4), ["b"]);
        s.set_expiry(a, NEVER);
        assert!(sweep_all(&mut s, 1000 * SEC, 4).is_empty());
        s.set_expiry(a, 5 * SEC);
        assert!(
            s.may_have_expired(5 * SEC),
            "a new deadline lowers the bound"
        );
        assert_eq!(sweep_all(&mut s, 6 * SEC, 4), ["a"]);
        assert_eq!(s.len(), 1);
        assert!(!s.may_have_expired(NEVER - 1), "no deadline left");
    }

    #[test]
    fn each_deadline_is_exact_to_the_millisecond() {
        let mut s: Shard<u32> = Shard::default();
        put(&mut s, "late", 7 * SEC + 900 * MS);
        put(&mut s, "early", 7 * SEC + 100 * MS);
        assert_eq!(sweep_all(&mut s, 7 * SEC + 500 * MS, 1), ["early"]);
        assert_eq!(
            sweep_all(&mut s, 7 * SEC + 900 * MS - 1, 1),
            Vec::<String>::new()
        );
        assert_eq!(sweep_all(&mut s, 7 * SEC + 900 * MS, 1), ["late"]);
        // A deadline is rounded down to the millisecond: gone once the asked one has passed.
        put(&mut s, "ns", 3 * SEC + MS - 1);
        assert!(sweep_all(&mut s, 3 * SEC - 1, 1).is_empty());
        assert_eq!(sweep_all(&mut s, 3 * SEC + MS - 1, 1), ["ns"]);
    }

    #[test]
    fn a_sweep_checks_no_more_slots_than_its_budget() {
        let mut s: Shard<u32> = Shard::default();
        for i in 0..1_000u64 {
            put(&mut s, &format!("k{i}"), (1 + i % 2) * SEC);
        }
        // Every second entry has expired: 10 slots hold 5 of them.
        let mut budget = 10;
        let mut n = 0;
        while s.pop_swept(SEC, &mut budget).is_some() {
            n += 1;
        }
        assert_eq!((n, budget, s.len()), (5, 0, 995));
        // Everything has expired: a budget of 10 takes 10 entries, and 100 calls take the rest.
        for _ in 0..100 {
            let before = s.len();
            let mut budget = 10;
            while s.pop_swept(2 * SEC, &mut budget).is_some() {}
            assert!(before - s.len() <= 10);
        }
        assert!(s.is_empty(), "{} left", s.len());
    }

    #[test]
    fn the_bound_is_free_while_nothing_can_have_expired() {
        let mut s: Shard<u32> = Shard::default();
        for i in 0..100u64 {
            put(&mut s, &format!("k{i}"), (100 + i) * SEC);
        }
        // Nothing expires before 100 s: a sweep spends nothing and moves no cursor.
        let mut budget = 10;
        assert!(s.pop_swept(99 * SEC, &mut budget).is_none());
        assert_eq!((budget, s.sweep), (10, 0));
        // At 150 s the sweep works; once a pass completes, the bound is the least deadline left.
        let gone = sweep_all(&mut s, 150 * SEC, 7);
        assert_eq!(gone.len(), 51);
        assert_eq!(s.earliest, 151 * SEC);
        assert!(!s.may_have_expired(150 * SEC + 999 * MS));
    }

    #[test]
    fn the_bound_stays_below_every_deadline_under_random_operations() {
        let mut rng = Rng(0x5DEE_CE66_D1CE_4E5B);
        let mut s: Shard<u32> = Shard::default();
        let mut model: HashMap<String, (u32, u64)> = HashMap::new();
        let mut now = SEC;
        for _ in 0..20_000 {
            let key = format!("k{}", rng.below(500));
            let deadline = match rng.below(4) {
                0 => NEVER,
                _ => now + rng.below(50) * 100 * MS,
            };
            match rng.below(8) {
                0..=3 => {
                    if let Some((slot, _)) = model.remove(&key) {
                        s.remove(slot);
                    }
                    let slot = put(&mut s, &key, deadline);
                    model.insert(key, (slot, deadline));
                }
                4 => {
                    if let Some((slot, _)) = model.remove(&key) {
                        s.remove(slot);
                    }
                }
                5 => {
                    if let Some(&(slot, _)) = model.get(&key) {
                        s.set_expiry(slot, deadline);
                        model.insert(key, (slot, deadline));
                    }
                }
                _ => {
                    now += rng.below(3) * 100 * MS;
                    let mut budget = 1 + rng.below(20) as u32;
                    while let Some(e) = s.pop_swept(now, &mut budget) {
                        let (_, d) = model.remove(&e.key().to_string()).expect("a stored key");
                        assert!(d <= now, "{} removed before its deadline", e.key());
                    }
                }
            }
            let least = model.values().map(|&(_, d)| d).min().unwrap_or(NEVER);
            assert!(s.earliest <= least, "the bound passed a deadline");
            assert_eq!(s.len(), model.len());
        }
        // Once the sweep has passed the whole slab, nothing expired is left.
        now += 10 * SEC;
        let gone = sweep_all(&mut s, now, 64);
        let expired = model.values().filter(|&&(_, d)| d <= now).count();
        assert_eq!(gone.len(), expired);
        assert!(s.iter().all(|e| !e.is_expired(now)));
    }

    #[test]
    fn expire_all_takes_every_expired_entry_and_tightens_the_bound() {
        let mut s: Shard<u32> = Shard::default();
        for i in 0..300u64 {
            put(&mut s, &format!("k{i}"), (1 + i % 3) * SEC);
        }
        let mut out = Vec::new();
        s.expire_all(2 * SEC, &mut out);
        assert_eq!((out.len(), s.len()), (200, 100));
        assert_eq!(s.earliest, 3 * SEC);
        assert!(s.iter().all(|e| e.expires() == 3 * SEC));
    }

    #[test]
    fn a_far_deadline_moves_the_entry_and_keeps_its_place() {
        let mut s: Shard<u32> = Shard::default();
        let slots: Vec<u32> = (0..3)
            .map(|i| put(&mut s, &format!("k{i}"), NEVER))
            .collect();
        let far = 100 * 86_400 * SEC;
        s.set_expiry(slots[1], far);
        assert_eq!(s.entry(slots[1]).expires(), far);
        assert_eq!(s.find(s.hash("k1"), "k1"), Some(slots[1]));
        assert!(!s.may_have_expired(far - 1) && s.may_have_expired(far));
        s.touch(slots[0]);
        let order: Vec<String> = std::iter::from_fn(|| s.pop_oldest())
            .map(|e| e.key().to_string())
            .collect();
        assert_eq!(order, ["k1", "k2", "k0"]);
    }

    /// Every key of `model` is found at its slot, and has its cell in the new table exactly
    /// when it is not left to copy from the old one; every key of `gone` is not found; the new
    /// table holds no other cell.
    fn check(s: &Shard<u32>, model: &HashMap<String, u32>, gone: &[String]) {
        assert_eq!(s.len(), model.len());
        let mut cells: HashMap<u32, usize> = HashMap::new();
        for &slot in s.table.iter() {
            *cells.entry(slot).or_default() += 1;
        }
        let mut in_new = 0;
        for (k, &slot) in model {
            let h = s.hash(k);
            assert_eq!(s.find(h, k), Some(slot), "{k}");
            let cells = cells.get(&slot).copied().unwrap_or(0);
            if s.only_in_old(slot) {
                assert_eq!(cells, 0, "{k} is left to copy");
                assert!(s.old.find(h, |&x| x == slot).is_some(), "{k} in old");
            } else {
                assert_eq!(cells, 1, "{k} has one cell in the new table");
                in_new += 1;
            }
        }
        assert_eq!(s.table.len(), in_new);
        for k in gone {
            if !model.contains_key(k) {
                assert_eq!(s.find(s.hash(k), k), None, "{k} was removed");
            }
        }
    }

    #[test]
    fn growth_keeps_every_key_found_exactly_once_under_mixed_operations() {
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        let mut s: Shard<u32> = Shard::default();
        let mut model: HashMap<String, u32> = HashMap::new();
        let mut gone: Vec<String> = Vec::new();
        let (mut growths, mut was_growing) = (0, false);
        for step in 0..6_000u64 {
            // Mostly inserts, so the table grows through several migrations.
            let key = format!("k{}", rng.below(3_000));
            match rng.below(10) {
                0..=5 => {
                    if let Some(&slot) = model.get(&key) {
                        // Overwrite: the store removes and inserts again.
                        s.remove(slot);
                    }
                    let slot = put(&mut s, &key, NEVER);
                    model.insert(key, slot);
                }
                6..=7 => {
                    if let Some(slot) = model.remove(&key) {
                        assert_eq!(s.remove(slot).key(), key);
                        gone.push(key);
                    }
                }
                8 => {
                    // Replace in place (a deadline in a new block keeps the slot).
                    if let Some(&slot) = model.get(&key) {
                        s.set_expiry(slot, (1_000 + step) * SEC);
                    }
                }
                _ => {
                    let found = s.find(s.hash(&key), &key);
                    assert_eq!(found, model.get(&key).copied());
                }
            }
            if s.growing() && !was_growing {
                growths += 1;
            }
            was_growing = s.growing();
            check(&s, &model, &gone[gone.len().saturating_sub(50)..]);
        }
        assert!(growths >= 6, "{growths} growths");
        check(&s, &model, &gone);
        // Removing everything empties both tables, growth or not.
        for (k, slot) in model.drain() {
            assert_eq!(s.remove(slot).key(), k);
        }
        assert!(s.is_empty() && s.table.is_empty());
        check(&s, &model, &gone);
    }

    #[test]
    fn no_operation_moves_more_than_the_step() {
        let mut s: Shard<u32> = Shard::default();
        let mut slots = Vec::new();
        let mut most = 0;
        for i in 0..200_000 {
            let before = s.moved;
            slots.push(put(&mut s, &format!("key-{i}"), NEVER));
            most = most.max(s.moved - before);
            if i % 3 == 0 {
                let before = s.moved;
                let slot = slots.swap_remove(slots.len() / 2);
                s.remove(slot);
                most = most.max(s.moved - before);
            }
        }
        assert_eq!(most, MIGRATE_STEP as usize);
        // Every entry was moved at least once per growth it lived through: the table grew.
        assert!(s.moved > 100_000, "{} moves", s.moved);
    }

    #[test]
    fn each_growth_finishes_before_the_next_starts() {
        let mut s: Shard<u32> = Shard::default();
        let mut capacity = s.table.capacity();
        let mut growths = 0;
        for i in 0..300_000 {
            let was_growing = s.growing();
            put(&mut s, &format!("key-{i}"), NEVER);
            if s.table.capacity() != capacity {
                growths += 1;
                assert!(
                    !was_growing,
                    "growth {growths} began before the last finished"
                );
                assert!(s.table.capacity() >= 2 * capacity);
                capacity = s.table.capacity();
            }
            // The table never grows by itself (that would rehash everything in one insert).
            assert!(s.table.len() <= capacity);
        }
        assert!(growths >= 15, "{growths} growths");
        assert!(!s.growing() || s.cursor < s.migrate_end);
    }

    #[test]
    fn a_table_growing_from_a_sparse_slab_skips_free_slots() {
        // The slab is longer than the live entries when the next growth starts: free slots are
        // passed over, and entries at reused slots move once.
        let mut s: Shard<u32> = Shard::default();
        let slots: Vec<u32> = (0..1_000)
            .map(|i| put(&mut s, &format!("a{i}"), NEVER))
            .collect();
        for &slot in slots.iter().step_by(2) {
            s.remove(slot);
        }
        let mut model: HashMap<String, u32> = HashMap::new();
        for i in (1..1_000).step_by(2) {
            model.insert(format!("a{i}"), slots[i]);
        }
        for i in 0..5_000 {
            let k = format!("b{i}");
            let slot = put(&mut s, &k, NEVER);
            model.insert(k, slot);
            if i % 97 == 0 {
                check(&s, &model, &[]);
            }
        }
        check(&s, &model, &[]);
        assert_eq!(s.drain().len(), model.len());
        assert!(s.table.is_empty() && s.old.is_empty() && !s.growing());
    }

    #[test]
    fn steady_churn_regrows_in_place_without_growing_the_table() {
        // Removals leave tombstones that use up hashbrown's room; the table is then replaced by
        // one sized for the live entries, incrementally, and stays as large as before.
        let mut s: Shard<u32> = Shard::default();
        let mut live: std::collections::VecDeque<(String, u32)> = (0..1_000)
            .map(|i| {
                let k = format!("k{i}");
                let slot = put(&mut s, &k, NEVER);
                (k, slot)
            })
            .collect();
        let (capacity, mut growths, mut was_growing) = (s.table.capacity(), 0, false);
        for i in 1_000..200_000 {
            let (k, slot) = live.pop_front().unwrap();
            assert_eq!(s.remove(slot).key(), k);
            let k = format!("k{i}");
            let slot = put(&mut s, &k, NEVER);
            live.push_back((k, slot));
            if s.growing() && !was_growing {
                growths += 1;
            }
            was_growing = s.growing();
            assert!(s.table.capacity() <= 2 * capacity, "{}", s.table.capacity());
        }
        assert!(growths > 0, "tombstones never used up the room");
        let model: HashMap<String, u32> = live.into_iter().collect();
        check(&s, &model, &["k0".to_string(), "k198999".to_string()]);
    }

    #[test]
    fn drain_empties() {
        let mut s: Shard<u32> = Shard::default();
        for i in 0..10 {
            put(&mut s, &format!("k{i}"), (100 + i) * SEC);
        }
        assert_eq!(s.drain().len(), 10);
        assert!(s.is_empty());
        assert!(!s.may_have_expired(NEVER - 1));
        assert!(sweep_all(&mut s, NEVER - 1, 4).is_empty());
        put(&mut s, "again", NEVER);
        assert_eq!(s.len(), 1);
    }
}
