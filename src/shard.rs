//! One shard of the store: a hash table of slot numbers into a slab of entries, threaded on
//! intrusive queues (the "lru" policy uses one, kept in recency order; S3-FIFO uses two, see
//! `s3fifo.rs`), with a heap of expiry stamps (earliest first). An entry keeps its key and, for a
//! small immutable value, the value's bytes in one heap block (`KeyBlock`); it keeps no hash.
//!
//! Nothing here locks or allocates Python objects: the store wraps each shard in a mutex and drops
//! what a shard hands back only after unlocking.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::atomic::AtomicU8;

use ahash::RandomState;
use hashbrown::HashTable;

use crate::clock::NEVER;
use crate::s3fifo::Ghost;
use crate::tags::Stamps;

const NIL: u32 = u32::MAX;

/// The heaviest entry a shard holds (its charge is kept in 32 bits): 4 GiB. The store refuses
/// heavier ones as too large, whatever `MAX_BYTES` says.
pub const MAX_WEIGHT: u64 = u32::MAX as u64;

/// The intrusive queue an entry is threaded on. The "lru" policy keeps everything on `Main`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Queue {
    Main = 0,
    Small = 1,
}

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

/// An entry's key and, for a small immutable value, the value's bytes (its payload), in one heap
/// block: one allocation instead of two, and no Python object header for the value.
pub struct KeyBlock {
    data: Box<[u8]>,
    key_len: u32,
}

impl KeyBlock {
    /// `key` followed by `payload`. Keys are at most 4 GiB (the store refuses heavier entries).
    pub fn new(key: &str, payload: &[u8]) -> Self {
        let mut data = Vec::with_capacity(key.len() + payload.len());
        data.extend_from_slice(key.as_bytes());
        data.extend_from_slice(payload);
        KeyBlock {
            data: data.into_boxed_slice(),
            key_len: u32::try_from(key.len()).expect("keys are shorter than 4 GiB"),
        }
    }
}

impl From<&str> for KeyBlock {
    fn from(key: &str) -> Self {
        KeyBlock::new(key, &[])
    }
}

pub struct Entry<V> {
    /// The key's bytes, then the payload (see `KeyBlock`).
    data: Box<[u8]>,
    key_len: u32,
    pub value: V,
    /// Clock stamp after which the entry is gone (`NEVER` for no expiry).
    pub expires: u64,
    /// Global recency stamp: smaller is less recently used.
    pub tick: u64,
    /// Unique stamp given when the value was stored; used to detect a concurrent replacement.
    pub gen: u64,
    /// Bytes charged to the store for this entry (see `weight`).
    weight: u32,
    pub tags: Stamps,
    /// Hits since the policy last looked at the entry (S3-FIFO; saturates at 3). Bumped under a
    /// shared lock, hence atomic.
    pub freq: AtomicU8,
    queue: Queue,
    prev: u32,
    next: u32,
    /// Microseconds (rounded up) the last computation of this value took (0: unknown, e.g.
    /// stored by `set`); early refresh (`crate::early`) weighs the time left before expiry
    /// against it. See `delta`.
    delta_us: u32,
}

impl<V> Entry<V> {
    pub fn new(
        key: impl Into<KeyBlock>,
        value: V,
        expires: u64,
        weight: u64,
        tags: impl Into<Stamps>,
    ) -> Self {
        debug_assert!(weight <= MAX_WEIGHT, "the store refuses heavier entries");
        let KeyBlock { data, key_len } = key.into();
        Entry {
            data,
            key_len,
            value,
            expires,
            tick: 0,
            gen: 0,
            weight: weight.min(MAX_WEIGHT) as u32,
            tags: tags.into(),
            freq: AtomicU8::new(0),
            queue: Queue::Main,
            prev: NIL,
            next: NIL,
            delta_us: 0,
        }
    }

    #[inline]
    pub fn key(&self) -> &str {
        // SAFETY: the block starts with the bytes of a `str` (`KeyBlock::new`), `key_len` long.
        unsafe { std::str::from_utf8_unchecked(&self.data[..self.key_len as usize]) }
    }

    /// Bytes of the key's block: the key and the payload.
    #[inline]
    pub fn block_len(&self) -> usize {
        self.data.len()
    }

    /// The value's bytes kept in the key's block (empty if the value holds them itself).
    #[inline]
    pub fn payload(&self) -> &[u8] {
        &self.data[self.key_len as usize..]
    }

    /// Gives the entry a new key block (same key, another payload); returns the old one.
    pub fn replace_block(&mut self, block: KeyBlock) -> Box<[u8]> {
        debug_assert_eq!(&block.data[..block.key_len as usize], self.key().as_bytes());
        self.key_len = block.key_len;
        std::mem::replace(&mut self.data, block.data)
    }

    /// Nanoseconds the last computation of the value took (0: unknown), to the microsecond.
    #[inline]
    pub fn delta(&self) -> u64 {
        u64::from(self.delta_us) * 1000
    }

    /// Records that computing the value took `nanos` nanoseconds (kept in whole microseconds,
    /// rounded up so that a recorded time is never taken for none; at most 71 minutes).
    pub fn set_delta(&mut self, nanos: u64) {
        self.delta_us = u32::try_from(nanos.div_ceil(1000)).unwrap_or(u32::MAX);
    }

    /// Bytes charged to the store for this entry.
    #[inline]
    pub fn weight(&self) -> u64 {
        u64::from(self.weight)
    }

    /// Charges the entry `weight` bytes (at most `MAX_WEIGHT`).
    pub fn set_weight(&mut self, weight: u64) {
        debug_assert!(weight <= MAX_WEIGHT);
        self.weight = weight.min(MAX_WEIGHT) as u32;
    }

    #[inline]
    pub fn is_expired(&self, now: u64) -> bool {
        self.expires != NEVER && self.expires <= now
    }

    /// The queue the entry is threaded on.
    pub fn queue(&self) -> Queue {
        self.queue
    }
}

enum Slot<V> {
    Used(Entry<V>),
    Free(u32),
}

/// Bytes one entry takes in a shard's slab (its `Vec` of slots).
pub const fn slot_size<V>() -> usize {
    std::mem::size_of::<Slot<V>>()
}

pub struct Shard<V> {
    /// The store's hasher: entries do not keep their hash; it is computed again from the key
    /// when the table grows or an entry leaves.
    hasher: RandomState,
    table: HashTable<u32>,
    slots: Vec<Slot<V>>,
    free: u32,
    queues: [Ends; 2],
    /// Hashes of keys recently evicted from the small queue (S3-FIFO only).
    pub(crate) ghost: Ghost,
    /// Deadlines of the entries that have one, earliest on top: 16 bytes an entry. Lazy: an
    /// element whose entry left or got another deadline stays (stale) until it reaches the top,
    /// where it is dropped, or until stale elements outnumber live ones and the heap is rebuilt.
    expiries: BinaryHeap<Reverse<(u64, u32)>>,
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
            slots: Vec::new(),
            free: NIL,
            queues: [EMPTY; 2],
            ghost: Ghost::default(),
            expiries: BinaryHeap::new(),
            stale: 0,
            timed: 0,
            len: 0,
        }
    }

    /// The hash of `key` under this shard's hasher.
    #[inline]
    pub fn hash(&self, key: &str) -> u64 {
        self.hasher.hash_one(key)
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
            Slot::Used(e) => e,
            Slot::Free(_) => unreachable!("slot {slot} is free"),
        }
    }

    #[inline]
    pub fn entry_mut(&mut self, slot: u32) -> &mut Entry<V> {
        match &mut self.slots[slot as usize] {
            Slot::Used(e) => e,
            Slot::Free(_) => unreachable!("slot {slot} is free"),
        }
    }

    /// The entry at `slot` if it is in use and still carries generation `gen`.
    pub fn entry_if(&self, slot: u32, gen: u64) -> Option<&Entry<V>> {
        match self.slots.get(slot as usize) {
            Some(Slot::Used(e)) if e.gen == gen => Some(e),
            _ => None,
        }
    }

    #[inline]
    pub fn find(&self, hash: u64, key: &str) -> Option<u32> {
        let slots = &self.slots;
        self.table
            .find(hash, |&s| match &slots[s as usize] {
                Slot::Used(e) => e.key() == key,
                Slot::Free(_) => false,
            })
            .copied()
    }

    /// Stores a new entry whose key hashes to `hash` (the key must not be present) at the most
    /// recent end; returns its slot.
    pub fn insert(&mut self, entry: Entry<V>, hash: u64, tick: u64) -> u32 {
        self.insert_in(entry, hash, tick, Queue::Main)
    }

    /// Stores a new entry whose key hashes to `hash` (the key must not be present) at the back of
    /// `queue`; returns its slot.
    pub fn insert_in(&mut self, mut entry: Entry<V>, hash: u64, tick: u64, queue: Queue) -> u32 {
        debug_assert_eq!(hash, self.hash(entry.key()));
        entry.tick = tick;
        entry.queue = queue;
        entry.prev = NIL;
        entry.next = NIL;
        let expires = entry.expires;
        let slot = if self.free != NIL {
            let slot = self.free;
            self.free = match self.slots[slot as usize] {
                Slot::Free(next) => next,
                Slot::Used(_) => unreachable!("free list points at a used slot"),
            };
            self.slots[slot as usize] = Slot::Used(entry);
            slot
        } else {
            assert!(self.slots.len() < NIL as usize, "shard is full");
            self.slots.push(Slot::Used(entry));
            (self.slots.len() - 1) as u32
        };
        self.link_back(slot, queue);
        let (slots, hasher) = (&self.slots, &self.hasher);
        self.table
            .insert_unique(hash, slot, |&s| match &slots[s as usize] {
                Slot::Used(e) => hasher.hash_one(e.key()),
                Slot::Free(_) => 0,
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
        let expires = self.entry(slot).expires;
        self.unlink(slot);
        if popped {
            self.timed = self.timed.saturating_sub(1);
        } else {
            self.unindex_expiry(expires);
        }
        if let Ok(found) = self.table.find_entry(hash, |&s| s == slot) {
            found.remove();
        }
        let old = std::mem::replace(&mut self.slots[slot as usize], Slot::Free(self.free));
        self.free = slot;
        self.len -= 1;
        match old {
            Slot::Used(e) => e,
            Slot::Free(_) => unreachable!(),
        }
    }

    /// Marks `slot` as the most recently used (the back of its queue).
    #[inline]
    pub fn touch(&mut self, slot: u32, tick: u64) {
        let queue = self.entry(slot).queue;
        if self.queues[queue as usize].tail != slot {
            self.move_to_back(slot, queue);
        }
        self.entry_mut(slot).tick = tick;
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

    /// The earliest expiry stamp in the shard (`NEVER` if none): nothing has expired before it.
    #[inline]
    pub fn next_expiry(&self) -> u64 {
        self.expiries.peek().map_or(NEVER, |&Reverse((e, _))| e)
    }

    pub fn set_expiry(&mut self, slot: u32, expires: u64) {
        let old = self.entry(slot).expires;
        if old != expires {
            self.unindex_expiry(old);
            self.entry_mut(slot).expires = expires;
            self.index_expiry(slot, expires);
        }
    }

    /// Recency stamp of the least recently used entry ("lru" policy: everything is on `Main`).
    pub fn oldest_tick(&self) -> Option<u64> {
        self.front(Queue::Main).map(|s| self.entry(s).tick)
    }

    pub fn pop_oldest(&mut self) -> Option<Entry<V>> {
        self.front(Queue::Main).map(|s| self.remove(s))
    }

    /// Removes one entry whose expiry has passed, if any (earliest first). O(1) when none has.
    #[inline]
    pub fn pop_expired(&mut self, now: u64) -> Option<Entry<V>> {
        loop {
            let &Reverse((expires, slot)) = self.expiries.peek()?;
            if expires > now {
                return None;
            }
            self.expiries.pop();
            if self.indexed(slot, expires) {
                let hash = self.hash(self.entry(slot).key());
                return Some(self.take(slot, hash, true));
            }
            self.stale = self.stale.saturating_sub(1);
        }
    }

    /// Whether `(expires, slot)` in the heap is the element of the entry now at `slot`. (A
    /// stale element that matches a later entry at the same slot with the very same deadline
    /// stands for that entry correctly.)
    #[inline]
    fn indexed(&self, slot: u32, expires: u64) -> bool {
        matches!(self.slots.get(slot as usize), Some(Slot::Used(e)) if e.expires == expires)
    }

    /// Every entry, in slot order.
    pub fn iter(&self) -> impl Iterator<Item = &Entry<V>> {
        self.slots.iter().filter_map(|s| match s {
            Slot::Used(e) => Some(e),
            Slot::Free(_) => None,
        })
    }

    /// Takes every entry out, leaving the shard empty.
    pub fn drain(&mut self) -> Vec<Entry<V>> {
        let slots = std::mem::take(&mut self.slots);
        *self = Shard::with_hasher(self.hasher.clone());
        slots
            .into_iter()
            .filter_map(|s| match s {
                Slot::Used(e) => Some(e),
                Slot::Free(_) => None,
            })
            .collect()
    }

    fn unlink(&mut self, slot: u32) {
        let (prev, next, q) = {
            let e = self.entry(slot);
            (e.prev, e.next, e.queue as usize)
        };
        if prev != NIL {
            self.entry_mut(prev).next = next;
        } else {
            self.queues[q].head = next;
        }
        if next != NIL {
            self.entry_mut(next).prev = prev;
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
            e.queue = queue;
            e.prev = tail;
            e.next = NIL;
        }
        if tail != NIL {
            self.entry_mut(tail).next = slot;
        } else {
            self.queues[q].head = slot;
        }
        self.queues[q].tail = slot;
        self.queues[q].len += 1;
    }

    fn index_expiry(&mut self, slot: u32, expires: u64) {
        if expires != NEVER {
            self.expiries.push(Reverse((expires, slot)));
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

    fn compact_expiries(&mut self) {
        let mut v = std::mem::take(&mut self.expiries).into_vec();
        v.retain(|&Reverse((expires, slot))| self.indexed(slot, expires));
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

    fn entry(key: &str, expires: u64) -> Entry<u32> {
        Entry::new(key, 1, expires, 1, Vec::new())
    }

    /// Inserts `key` at the recent end of `s`.
    fn put(s: &mut Shard<u32>, key: &str, expires: u64, tick: u64) -> u32 {
        let hash = s.hash(key);
        s.insert(entry(key, expires), hash, tick)
    }

    #[test]
    fn insert_find_remove_reuses_slots() {
        let mut s: Shard<u32> = Shard::default();
        let a = put(&mut s, "a", NEVER, 1);
        let b = put(&mut s, "b", NEVER, 2);
        assert_eq!(s.find(s.hash("a"), "a"), Some(a));
        assert_eq!(s.find(s.hash("b"), "b"), Some(b));
        assert_eq!(s.find(s.hash("c"), "c"), None);
        assert_eq!(s.remove(a).key(), "a");
        assert_eq!(s.find(s.hash("a"), "a"), None);
        let c = put(&mut s, "c", NEVER, 3);
        assert_eq!(c, a, "freed slot is reused");
        assert_eq!(s.len(), 2);
    }

    #[test]
    fn keys_are_found_after_the_table_grows_and_shrinks_without_stored_hashes() {
        let mut s: Shard<u32> = Shard::default();
        let slots: Vec<u32> = (0..5_000)
            .map(|i| put(&mut s, &format!("key-{i}"), NEVER, i))
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
            .map(|i| put(&mut s, &format!("k{i}"), NEVER, i))
            .collect();
        s.touch(slots[0], 10);
        s.touch(slots[2], 11);
        let order: Vec<String> = std::iter::from_fn(|| s.pop_oldest())
            .map(|e| e.key().to_string())
            .collect();
        assert_eq!(order, ["k1", "k3", "k0", "k2"]);
        assert!(s.is_empty());
    }

    #[test]
    fn expiry_index_pops_in_order_and_tracks_changes() {
        let mut s: Shard<u32> = Shard::default();
        let a = put(&mut s, "a", 50, 1);
        put(&mut s, "b", 20, 2);
        put(&mut s, "c", NEVER, 3);
        assert!(s.pop_expired(10).is_none());
        assert_eq!(s.pop_expired(30).unwrap().key(), "b");
        assert!(s.pop_expired(30).is_none());
        s.set_expiry(a, NEVER);
        assert!(s.pop_expired(1000).is_none());
        s.set_expiry(a, 5);
        assert_eq!(s.pop_expired(6).unwrap().key(), "a");
        assert_eq!(s.len(), 1);
    }

    #[test]
    fn lazy_expiry_heap_stays_bounded_and_exact_under_churn() {
        let mut s: Shard<u32> = Shard::default();
        let slots: Vec<u32> = (0..100)
            .map(|i| put(&mut s, &format!("k{i}"), 1_000 + i, i))
            .collect();
        // Every deadline changes many times: each change leaves a stale element behind.
        for round in 0..50u64 {
            for (i, &slot) in slots.iter().enumerate() {
                s.set_expiry(slot, 2_000 + round * 100 + (99 - i as u64));
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
            put(&mut s, &format!("n{i}"), 10_000 + i as u64, 0);
        }
        assert_eq!(s.next_expiry(), 2_000 + 49 * 100);
        // Expired entries come out earliest first, each once, and nothing else does.
        let now = 7_000;
        let mut out = Vec::new();
        while let Some(e) = s.pop_expired(now) {
            out.push(e.expires);
        }
        assert_eq!(out.len(), 50);
        assert!(out.windows(2).all(|w| w[0] <= w[1]));
        assert!(out.iter().all(|&e| e <= now));
        assert_eq!(s.len(), 50);
        assert!(s.pop_expired(u64::MAX - 1).is_some());
    }

    #[test]
    fn drain_empties() {
        let mut s: Shard<u32> = Shard::default();
        for i in 0..10 {
            put(&mut s, &format!("k{i}"), 100 + i, i);
        }
        assert_eq!(s.drain().len(), 10);
        assert!(s.is_empty());
        assert!(s.pop_expired(u64::MAX - 1).is_none());
        put(&mut s, "again", NEVER, 1);
        assert_eq!(s.len(), 1);
    }
}
