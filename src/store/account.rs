//! Byte accounting: what an entry is charged (`weigh`, `charge`), taking an entry off the books
//! (`detach`), and the compare-and-swap steps that take and give back places and bytes.

use crate::sync::atomic::Ordering::Relaxed;

use super::*;

/// Bytes charged per entry besides its value: the slab slot, the hash-table cell, the entry's
/// block (`block` bytes: header, tail, key and payload; a deadline lives there, and expiry has
/// no index: see `shard.rs`), and its tag stamps. See `mem.rs`. (Its places in the tags' member
/// lists are counted with the tags, `TagTable::bytes`, as those lists really are.)
pub fn entry_overhead(block: usize, tags: usize) -> u64 {
    let stamps = Stamps::heap_size(tags);
    (SLOT_SIZE + TABLE_CELL + malloc_chunk(block) + stamps) as u64
}

impl<V: Weigh> Store<V> {
    /// Bytes an entry with this key, value, number of tags and expiry stamp is charged (as
    /// `charge` will find once it is stored, without a compute time).
    /// At most `MAX_WEIGHT + 1` (an entry that cannot be stored, see `MAX_WEIGHT`).
    pub fn weigh(key: &str, value: &V, tags: usize, expires: u64) -> u64 {
        let block = planned_size::<V>(key, value, tags > 0, expires, 0);
        Self::weigh_parts(value.weight(), block, tags)
    }

    pub(super) fn weigh_parts(value: usize, block: usize, tags: usize) -> u64 {
        let w = (value as u64).saturating_add(entry_overhead(block, tags));
        w.min(MAX_WEIGHT + 1)
    }

    /// Bytes charged for `e`: derived from the entry itself (its block, its value's weight, its
    /// tags) unless it carries a fixed charge (see `touch`).
    #[inline]
    pub fn charge(e: &Entry<V>) -> u64 {
        match e.fixed_weight() {
            Some(w) => w,
            None => {
                let (block, tags, _) = e.footprint();
                Self::weigh_parts(e.value().weight(), block, tags)
            }
        }
    }

    /// Removes `slot` and takes it off the books.
    pub(super) fn detach(&self, shard: &mut Shard<V>, slot: u32) -> Entry<V> {
        let e = shard.remove(slot);
        self.unbook(&e);
        e
    }

    /// Takes `e`, already out of its shard, off the books: its place and its charge.
    #[inline]
    pub(super) fn unbook(&self, e: &Entry<V>) {
        self.len.fetch_sub(1, Relaxed);
        self.bytes.fetch_sub(Self::charge(e), Relaxed);
    }

    /// Moves the books from an entry's charge `old` to `new`: always when it shrinks, when it
    /// grows only if the growth fits under `limits.max_bytes` (false: nothing changed).
    pub(super) fn recharge(&self, old: u64, new: u64, limits: &Limits) -> bool {
        match (new > old, limits.max_bytes) {
            (false, _) => {
                self.bytes.fetch_sub(old - new, Relaxed);
                true
            }
            (true, None) => {
                self.bytes.fetch_add(new - old, Relaxed);
                true
            }
            (true, Some(max)) => self.take_bytes(max, new - old),
        }
    }

    /// Takes a place in the entry count if that keeps it within `cap`.
    pub(super) fn take_place(&self, cap: usize) -> bool {
        self.len
            .fetch_update(Relaxed, Relaxed, |n| (n < cap).then_some(n + 1))
            .is_ok()
    }

    /// Charges `weight` bytes if that keeps the store within `max`.
    pub(super) fn take_bytes(&self, max: u64, weight: u64) -> bool {
        self.bytes
            .fetch_update(Relaxed, Relaxed, |b| {
                (b + self.tags.bytes() + weight <= max).then_some(b + weight)
            })
            .is_ok()
    }

    /// Gives back the place and bytes an insert took, when it stores nothing after all.
    pub(super) fn give_back(&self, placed: bool, charged: bool, weight: u64) {
        if placed {
            self.len.fetch_sub(1, Relaxed);
        }
        if charged {
            self.bytes.fetch_sub(weight, Relaxed);
        }
    }
}

// Under `shuttle` the store's primitives work only inside a shuttle run: see the models.
#[cfg(all(test, not(feature = "shuttle")))]
mod tests {
    use super::*;
    use crate::clock::NEVER;
    use crate::store::testing::*;

    #[test]
    fn charges_follow_the_block_deadline_and_tags() {
        let w = |key: &str, tags, expires| Store::<Val>::weigh(key, &Val(100), tags, expires);
        // The block: a 24-byte header, the 8-byte value, the key. Keys of up to 8 bytes fit a
        // 48-byte malloc chunk; the 9th byte takes the next.
        assert_eq!(w("k", 0, NEVER), w(&"k".repeat(8), 0, NEVER));
        assert_eq!(w(&"k".repeat(9), 0, NEVER), w("k", 0, NEVER) + 16);
        // A deadline within the header's 49 days costs nothing more (expiry has no index).
        assert_eq!(w("k", 0, 5 * SEC), w("k", 0, NEVER));
        assert!(w("k", 1, NEVER) > w("k", 0, NEVER) + std::mem::size_of::<TagStamp>() as u64);
        // A deadline beyond the header's 49 days takes 8 bytes of tail: the next chunk here.
        let far = 60 * 86_400 * SEC;
        assert_eq!(w("k", 0, far), w("k", 0, 5 * SEC) + 16);

        // touch moves the charge with the deadline; the books stay those of the entries held.
        let store: Store<Val> = Store::new(2);
        let lim = limits(100, None);
        set(&store, "k", 100, &lim, 1);
        assert_eq!(store.bytes(), w("k", 0, NEVER));
        assert!(store.touch("k", 50 * SEC, &lim, 1));
        assert_eq!(store.bytes(), w("k", 0, 50 * SEC));
        assert!(store.touch("k", far, &lim, 1));
        assert_eq!(store.bytes(), w("k", 0, far));
        assert_eq!(store.expiry("k", 1), Some(far));
        assert!(store.touch("k", 50 * SEC, &lim, 1));
        assert_eq!(store.bytes(), w("k", 0, 50 * SEC));
        assert!(store.touch("k", NEVER, &lim, 1));
        assert_eq!(store.bytes(), w("k", 0, NEVER));
        // Under a bound the far deadline's tail does not fit in, touch keeps the old charge.
        let tight = limits(100, Some(store.bytes()));
        assert!(store.touch("k", far, &tight, 1));
        assert_eq!(store.bytes(), w("k", 0, NEVER));
        assert_eq!(store.expiry("k", 1), Some(far));
        // ... and gives it up once the derived one fits again.
        assert!(store.touch("k", NEVER, &tight, 1));
        assert_eq!(store.bytes(), w("k", 0, NEVER));
        assert!(store.touch("k", 70 * SEC, &lim, 1));
        assert_eq!(store.bytes(), w("k", 0, 70 * SEC));
        store.delete("k", 1);
        assert_eq!(store.bytes(), 0);
    }

    #[test]
    fn a_compute_time_is_charged_and_refused_when_it_does_not_fit() {
        let store: Store<Val> = Store::new(1);
        let lim = limits(100, None);
        let key = "k".repeat(8); // 24 + 8 + 8 = 40 bytes: 4 more take the next chunk
        store.set(&key, Val(1), 50 * SEC, Vec::new(), &lim, 1);
        let before = store.bytes();
        let tight = limits(100, Some(before));
        assert!(!store.set_delta(&key, 50 * SEC, 2_000, &tight, 1));
        assert_eq!(store.bytes(), before);
        assert_eq!(store.get_entry(&key, 1, |e| e.delta()), Some(0));
        assert!(store.set_delta(&key, 50 * SEC, 2_000, &lim, 1));
        assert_eq!(store.bytes(), before + 16);
        assert_eq!(store.get_entry(&key, 1, |e| e.delta()), Some(2_000));
        // Only the entry just stored (same deadline) gets it.
        assert!(!store.set_delta(&key, 51 * SEC, 2_000, &lim, 1));
        store.delete(&key, 1);
        assert_eq!(store.bytes(), 0);
    }

    #[test]
    fn an_entry_of_4_gib_or_more_is_too_large_even_without_a_bound() {
        let store: Store<Val> = Store::new(2);
        let lim = limits(100, None);
        assert_eq!(set(&store, "big", usize::MAX, &lim, 1), Put::TooLarge);
        assert_eq!(
            set(&store, "big", u32::MAX as usize, &lim, 1),
            Put::TooLarge
        );
        assert_eq!((store.len(), store.bytes()), (0, 0));
        assert_eq!(set(&store, "ok", 1 << 31, &lim, 1), Put::Stored);
        assert_eq!(store.bytes(), Store::weigh("ok", &Val(1 << 31), 0, NEVER));
    }
}
