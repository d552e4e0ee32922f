//! One shard of the store: a hash table of slot numbers into a slab of entries (8-byte pointers
//! to their blocks, see `entry.rs`), threaded on intrusive queues (the "lru" policy uses one,
//! kept in recency order; S3-FIFO uses two, see `s3fifo.rs`), with a heap of expiry seconds
//! (earliest first). An entry keeps its key and, for a small immutable value, the value's bytes in
//! its block; it keeps no hash.
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

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use ahash::RandomState;
use hashbrown::HashTable;

use crate::clock::NEVER;
use crate::entry::second_of;
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

/// Bytes one entry takes in a shard's slab (its `Vec` of slots and the `Vec` of their
/// generations beside it): a pointer and a `u32`.
pub const SLOT_SIZE: usize = std::mem::size_of::<Option<Entry<()>>>() + std::mem::size_of::<u32>();

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
    /// The generation of the entry at each slot (as long as `slots`): the store's write counter
    /// when its value was stored, which detects a concurrent replacement (`Store::replace_if`,
    /// the tags' member lists). Kept here rather than in the entry's block, whose size decides
    /// its malloc chunk (see `entry.rs`).
    gens: Vec<u32>,
    /// Free slot numbers, the most recently freed last.
    free: Vec<u32>,
    queues: [Ends; 2],
    /// Hashes of keys recently evicted from the small queue (S3-FIFO only).
    pub(crate) ghost: Ghost,
    /// The frequency sketch and window climber (W-TinyLFU only; empty otherwise).
    pub(crate) tiny: TinyLfu,
    /// `(second, slot)` of the entries that have a deadline, earliest second on top: 8 bytes an
    /// entry. Coarse: within a second the order is by slot, so `pop_expired` checks each entry's
    /// exact deadline. Lazy: an element whose entry left or got another deadline stays (stale)
    /// until it reaches the top, where it is dropped, or until stale elements outnumber live ones
    /// and the heap is rebuilt.
    expiries: BinaryHeap<Reverse<(u32, u32)>>,
    /// Stale elements in `expiries`, and elements of live entries.
    stale: usize,
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
            gens: Vec::new(),
            free: Vec::new(),
            queues: [EMPTY; 2],
            ghost: Ghost::default(),
            tiny: TinyLfu::default(),
            expiries: BinaryHeap::new(),
            stale: 0,
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

    /// The entry at `slot` if it is in use and still carries generation `gen`.
    pub fn entry_if(&self, slot: u32, gen: u32) -> Option<&Entry<V>> {
        match self.slots.get(slot as usize) {
            Some(Some(e)) if self.gens[slot as usize] == gen => Some(e),
            _ => None,
        }
    }

    /// The generation of the entry at `slot` (0 until `set_gen`; kept by `swap` and
    /// `replace_with`).
    #[inline]
    pub fn gen(&self, slot: u32) -> u32 {
        debug_assert!(self.slots[slot as usize].is_some(), "slot {slot} is free");
        self.gens[slot as usize]
    }

    #[inline]
    pub fn set_gen(&mut self, slot: u32, gen: u32) {
        debug_assert!(self.slots[slot as usize].is_some(), "slot {slot} is free");
        self.gens[slot as usize] = gen;
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
                self.gens[slot as usize] = 0;
                slot
            }
            None => {
                assert!(self.slots.len() < NIL as usize, "shard is full");
                self.slots.push(Some(entry));
                self.gens.push(0);
                (self.slots.len() - 1) as u32
            }
        };
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
        self.index_expiry(slot, expires);
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
        self.take(slot, hash, false)
    }

    /// Removes the entry at `slot`; `popped`: its expiry element is already off the heap.
    fn take(&mut self, slot: u32, hash: u64, popped: bool) -> Entry<V> {
        let expires = self.entry(slot).expires();
        self.unlink(slot);
        if popped {
            self.timed = self.timed.saturating_sub(1);
        } else {
            self.unindex_expiry(expires);
        }
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
        self.len -= 1;
        self.migrate(MIGRATE_STEP);
        old.expect("a removed slot was in use")
    }

    /// Replaces the entry at `slot` by `f(entry)`, which keeps its key and its place in the
    /// queues (its links: see `Entry::reshaped`); the expiry index follows a new deadline.
    pub fn replace_with(&mut self, slot: u32, f: impl FnOnce(Entry<V>) -> Entry<V>) {
        let old = self.slots[slot as usize]
            .take()
            .expect("a replaced slot is in use");
        let before = old.expires();
        let new = f(old);
        let after = new.expires();
        self.slots[slot as usize] = Some(new);
        if before != after {
            self.unindex_expiry(before);
            self.index_expiry(slot, after);
        }
    }

    /// Puts `new` (made by `Entry::with_value` from the entry at `slot`) in its place and returns
    /// the old entry.
    pub fn swap(&mut self, slot: u32, new: Entry<V>) -> Entry<V> {
        debug_assert_eq!(new.key(), self.entry(slot).key());
        debug_assert_eq!(new.expires(), self.entry(slot).expires());
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

    /// When the shard next has an entry to reclaim (`NEVER` if none has a deadline): the exact
    /// deadline of the entry on top of the expiry index, or the start of its second when that
    /// element is stale. (Another entry of the same second may expire first; reads check every
    /// entry's own deadline, so this only decides when to reclaim.)
    #[inline]
    pub fn next_expiry(&self) -> u64 {
        match self.expiries.peek() {
            None => NEVER,
            Some(&Reverse((second, slot))) if self.indexed(slot, second) => {
                self.entry(slot).expires()
            }
            Some(&Reverse((second, _))) => u64::from(second) * 1_000_000_000,
        }
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

    /// Removes one entry whose deadline has passed, if any (earliest second first). Stops at an
    /// entry of the current second not yet expired (reads check every entry's exact deadline,
    /// so an expired entry behind it is never served). O(1) when none has expired.
    #[inline]
    pub fn pop_expired(&mut self, now: u64) -> Option<Entry<V>> {
        let now_second = second_of(now);
        loop {
            let &Reverse((second, slot)) = self.expiries.peek()?;
            if second > now_second {
                return None;
            }
            if self.indexed(slot, second) {
                if !self.entry(slot).is_expired(now) {
                    return None;
                }
                self.expiries.pop();
                let hash = self.hash(self.entry(slot).key());
                return Some(self.take(slot, hash, true));
            }
            self.expiries.pop();
            self.stale = self.stale.saturating_sub(1);
        }
    }

    /// Whether `(second, slot)` in the heap is the element of the entry now at `slot`. (A
    /// stale element that matches a later entry at the same slot with a deadline in the very
    /// same second stands for that entry correctly.)
    #[inline]
    fn indexed(&self, slot: u32, second: u32) -> bool {
        matches!(self.slots.get(slot as usize), Some(Some(e))
            if e.expires() != NEVER && second_of(e.expires()) == second)
    }

    /// Every entry, in slot order.
    pub fn iter(&self) -> impl Iterator<Item = &Entry<V>> {
        self.slots.iter().flatten()
    }

    /// Takes every entry out, leaving the shard empty.
    pub fn drain(&mut self) -> Vec<Entry<V>> {
        let slots = std::mem::take(&mut self.slots);
        *self = Shard::with_hasher(self.hasher.clone());
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

    fn index_expiry(&mut self, slot: u32, expires: u64) {
        if expires != NEVER {
            self.expiries.push(Reverse((second_of(expires), slot)));
            self.timed += 1;
        }
    }

    /// Marks the element of an entry leaving `slot` (or changing its deadline) as stale; rebuilds
    /// the heap once stale elements outnumber live ones (amortized O(1) a removal).
    fn unindex_expiry(&mut self, expires: u64) {
        if expires != NEVER {
            self.stale += 1;
            self.timed = self.timed.saturating_sub(1);
            if self.stale > 64 && self.stale > self.timed {
                self.compact_expiries();
            }
        }
    }

    /// Rebuilds the heap with one element per timed entry. A stale element can look like the
    /// element of a later entry at the same slot with a deadline in the same second (a key
    /// overwritten again and again, its slot reused): such duplicates go too.
    fn compact_expiries(&mut self) {
        let mut v = std::mem::take(&mut self.expiries).into_vec();
        let mut seen = vec![0u64; self.slots.len().div_ceil(64)];
        v.retain(|&Reverse((second, slot))| {
            if !self.indexed(slot, second) {
                return false;
            }
            // Every element kept for a slot is the same `(second, slot)`: keep the first.
            let (word, bit) = (slot as usize / 64, 1u64 << (slot % 64));
            let first = seen[word] & bit == 0;
            seen[word] |= bit;
            first
        });
        if v.capacity() > 2 * v.len() {
            v.shrink_to_fit();
        }
        self.expiries = BinaryHeap::from(v);
        self.stale = self.expiries.len() - self.timed.min(self.expiries.len());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
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
    fn a_slot_is_a_pointer_and_a_generation() {
        assert_eq!(SLOT_SIZE, 12);
        assert_eq!(std::mem::size_of::<Option<Entry<u32>>>(), 8);
    }

    #[test]
    fn a_generation_belongs_to_its_slot_until_the_slot_is_reused() {
        let mut s: Shard<u32> = Shard::default();
        let a = put(&mut s, "a", NEVER);
        assert_eq!(s.gen(a), 0);
        s.set_gen(a, 7);
        assert!(s.entry_if(a, 7).is_some_and(|e| e.key() == "a"));
        assert!(s.entry_if(a, 6).is_none());
        assert!(s.entry_if(a + 1, 0).is_none(), "no such slot");
        // A new deadline (a new block) and a swapped-in entry keep the slot's generation.
        s.set_expiry(a, 60 * 86_400 * SEC);
        assert_eq!(s.gen(a), 7);
        let mut new = entry("a", 60 * 86_400 * SEC);
        new.take_place_of(s.entry(a));
        drop(s.swap(a, new));
        assert!(s.entry_if(a, 7).is_some());
        // Once the entry leaves, its generation no longer finds anything, nor in the next
        // entry at the same slot.
        drop(s.remove(a));
        assert!(s.entry_if(a, 7).is_none());
        let b = put(&mut s, "b", NEVER);
        assert_eq!((b, s.gen(b)), (a, 0));
        assert!(s.entry_if(b, 7).is_none());
        s.set_gen(b, 8);
        assert!(s.entry_if(b, 8).is_some_and(|e| e.key() == "b"));
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

    #[test]
    fn expiry_index_pops_in_order_and_tracks_changes() {
        let mut s: Shard<u32> = Shard::default();
        let a = put(&mut s, "a", 50 * SEC);
        put(&mut s, "b", 20 * SEC);
        put(&mut s, "c", NEVER);
        assert!(s.pop_expired(10 * SEC).is_none());
        assert_eq!(s.next_expiry(), 20 * SEC);
        assert_eq!(s.pop_expired(30 * SEC).unwrap().key(), "b");
        assert!(s.pop_expired(30 * SEC).is_none());
        s.set_expiry(a, NEVER);
        assert!(s.pop_expired(1000 * SEC).is_none());
        s.set_expiry(a, 5 * SEC);
        assert_eq!(s.pop_expired(6 * SEC).unwrap().key(), "a");
        assert_eq!(s.len(), 1);
        assert_eq!(s.next_expiry(), NEVER);
    }

    #[test]
    fn within_a_second_each_deadline_is_exact() {
        let mut s: Shard<u32> = Shard::default();
        // Slot order puts the later deadline on top of the coarse heap.
        put(&mut s, "late", 7 * SEC + 900 * MS);
        put(&mut s, "early", 7 * SEC + 100 * MS);
        let now = 7 * SEC + 500 * MS;
        // The top of the heap has not expired: reclaiming stops there, and removes nothing
        // before its time.
        assert!(s.pop_expired(now).is_none());
        assert_eq!(s.len(), 2);
        assert!(s.iter().any(|e| e.key() == "early" && e.is_expired(now)));
        let gone: Vec<String> = std::iter::from_fn(|| s.pop_expired(8 * SEC))
            .map(|e| e.key().to_string())
            .collect();
        assert_eq!(gone.len(), 2);
        // A deadline is rounded down to the millisecond: gone once the asked one has passed.
        put(&mut s, "ns", 3 * SEC + MS - 1);
        assert!(s.pop_expired(3 * SEC - 1).is_none());
        assert_eq!(s.pop_expired(3 * SEC + MS - 1).unwrap().key(), "ns");
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
        assert_eq!(s.next_expiry(), far);
        s.touch(slots[0]);
        let order: Vec<String> = std::iter::from_fn(|| s.pop_oldest())
            .map(|e| e.key().to_string())
            .collect();
        assert_eq!(order, ["k1", "k2", "k0"]);
    }

    #[test]
    fn lazy_expiry_heap_stays_bounded_and_exact_under_churn() {
        let mut s: Shard<u32> = Shard::default();
        let slots: Vec<u32> = (0..100)
            .map(|i| put(&mut s, &format!("k{i}"), (1_000 + i) * SEC))
            .collect();
        // Every deadline changes many times: each change leaves a stale element behind.
        for round in 0..50u64 {
            for (i, &slot) in slots.iter().enumerate() {
                s.set_expiry(slot, (2_000 + round * 100 + (99 - i as u64)) * SEC);
            }
            assert!(
                s.expiries.len() <= 2 * 100 + 65,
                "{} elements",
                s.expiries.len()
            );
        }
        // Replace half of the entries (remove, then insert at the freed slots).
        for i in (0..100).step_by(2) {
            s.remove(slots[i]);
            put(&mut s, &format!("n{i}"), (10_000 + i as u64) * SEC);
        }
        assert_eq!(s.next_expiry(), (2_000 + 49 * 100) * SEC);
        // Expired entries come out earliest first, each once, and nothing else does.
        let now = 7_000 * SEC;
        let mut out = Vec::new();
        while let Some(e) = s.pop_expired(now) {
            out.push(e.expires());
        }
        assert_eq!(out.len(), 50);
        assert!(out.windows(2).all(|w| w[0] <= w[1]));
        assert!(out.iter().all(|&e| e <= now));
        assert_eq!(s.len(), 50);
        assert!(s.pop_expired(NEVER - 1).is_some());
    }

    #[test]
    fn overwriting_a_key_within_a_second_keeps_the_heap_small() {
        let mut s: Shard<u32> = Shard::default();
        put(&mut s, "other", 9 * SEC);
        for i in 0..10_000u64 {
            // The same key, the same slot, a deadline in the same second each time.
            if let Some(slot) = s.find(s.hash("k"), "k") {
                s.remove(slot);
            }
            put(&mut s, "k", 5 * SEC + i * 10_000);
            assert!(
                s.expiries.len() <= 2 * 2 + 65,
                "{} elements",
                s.expiries.len()
            );
        }
        // Stale elements of other seconds for the same slot do not hide the live one.
        for i in 0..100u64 {
            let slot = s.find(s.hash("k"), "k").unwrap();
            s.set_expiry(slot, (20 + i) * SEC);
        }
        let slot = s.find(s.hash("k"), "k").unwrap();
        s.set_expiry(slot, 5 * SEC + 500 * MS);
        assert!(
            s.expiries.len() <= 2 * 2 + 65,
            "{} elements",
            s.expiries.len()
        );
        assert_eq!(s.pop_expired(6 * SEC).unwrap().key(), "k");
        assert!(s.pop_expired(6 * SEC).is_none());
        assert_eq!(s.pop_expired(9 * SEC).unwrap().key(), "other");
        assert!(s.expiries.is_empty() || s.pop_expired(NEVER - 1).is_none());
    }

    /// A small deterministic generator (xorshift64*), so that the randomized tests are seeded
    /// without a dependency.
    struct Rng(u64);

    impl Rng {
        fn below(&mut self, n: u64) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) % n
        }
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
        assert!(s.pop_expired(NEVER - 1).is_none());
        put(&mut s, "again", NEVER);
        assert_eq!(s.len(), 1);
    }
}
