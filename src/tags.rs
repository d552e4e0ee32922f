//! Tag versions: every tag is a cell with a version number; an entry remembers the versions of its
//! tags when it is stored and is a miss as soon as any of them has moved on.
//!
//! Invalidating a tag is one atomic increment, whatever the size of the store. Each cell also keeps
//! the list of entries stored under it so that their memory can be reclaimed right away (without a
//! scan of the store); that list is compacted when it fills with references to entries that are gone.
//!
//! A cell lives while something refers to it: the table, and every stamp (held by a stored entry,
//! a snapshot or an operation in flight). When the last stamp goes, the table forgets the cell, so
//! a tag per row costs nothing once its rows are gone. Nothing can go wrong by forgetting it: no
//! stamp of it is left to compare, and a cell made later for the same name is another cell (a
//! stamp holds its own cell, never a name), so it can neither revive an invalidated entry nor be
//! invalidated for ever. What the table holds (cells, names, slots, member lists) is counted in
//! `bytes`, which the store adds to its own so that `MAX_BYTES` bounds it too.

use ahash::RandomState;
use hashbrown::HashTable;
use std::mem::size_of;

use crate::sync::atomic::{AtomicU64, Ordering};
use crate::sync::{random_state, Arc, Mutex, Weak};

use crate::mem::malloc_chunk;

/// Where a tagged entry lives: shard, slot and the generation it got when it was stored or its
/// value last changed (`Entry::gen`), which no later entry at the slot carries (short of the
/// store's 32-bit counter wrapping around between the two).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct EntryRef {
    pub shard: u32,
    pub slot: u32,
    pub gen: u32,
}

/// A member list is compacted once it holds this many refs (or twice its live ones after the
/// last compaction): small, so that a tag per row keeps a list of a few refs.
const MIN_COMPACT: usize = 8;

/// Refs a new cell's member list has room for (Rust's own first capacity for 12-byte items).
const FIRST_MEMBERS: usize = 4;

/// The table forgets cells nobody refers to when it reaches this many (or twice its size after
/// the last sweep). Cells are forgotten as their last stamp goes; the sweep only catches those
/// whose last two stamps went at once (each saw the other).
const MIN_SWEEP: usize = 1024;

/// A cell's place in the table: an 8-byte pointer and a control byte, over ~1.6 buckets a cell
/// (hashbrown fills to 7/8, then doubles), as `mem::TABLE_CELL`.
const TABLE_SLOT: usize = 16;

pub struct Members {
    refs: Vec<EntryRef>,
    /// Compact when `refs` grows past this; doubles after each compaction so it stays amortized O(1).
    compact_at: usize,
    /// Bytes of `refs` counted in the table's `bytes`.
    charged: usize,
    /// Out of the table (after `reset`): nothing is recorded or counted any more.
    detached: bool,
}

impl Members {
    fn heap(&self) -> usize {
        malloc_chunk(self.refs.capacity() * size_of::<EntryRef>())
    }
}

pub struct TagCell {
    version: AtomicU64,
    name: Box<str>,
    table: Weak<Shared>,
    members: Mutex<Members>,
}

impl TagCell {
    #[inline]
    pub fn version(&self) -> u64 {
        self.version.load(Ordering::Acquire)
    }

    /// Moves the version on: every entry stamped with an older one becomes a miss.
    pub fn bump(&self) {
        self.version.fetch_add(1, Ordering::AcqRel);
    }

    /// Bytes a cell for a tag of `name_len` bytes takes besides its member list: its `Arc` block,
    /// its name and its place in the table.
    pub fn cost(name_len: usize) -> u64 {
        (malloc_chunk(2 * size_of::<usize>() + size_of::<TagCell>())
            + malloc_chunk(name_len)
            + TABLE_SLOT) as u64
    }
}

/// An entry's record of one tag: the cell and the version it had when the entry was stored.
/// Dropping the last stamp of a cell makes the table forget it.
#[derive(Clone)]
pub struct TagStamp {
    pub cell: Arc<TagCell>,
    pub version: u64,
}

impl TagStamp {
    #[inline]
    pub fn is_current(&self) -> bool {
        self.cell.version() == self.version
    }
}

impl Drop for TagStamp {
    fn drop(&mut self) {
        // Two holders: this stamp and (perhaps) the table. Nobody else can get the cell but
        // through the table, whose lock `release` takes before it looks again.
        if Arc::strong_count(&self.cell) == 2 {
            if let Some(shared) = self.cell.table.upgrade() {
                shared.release(&self.cell);
            }
        }
    }
}

/// An entry's tag stamps behind one thin pointer (8 bytes in the entry, null for the many entries
/// without tags), read as a slice.
#[derive(Clone, Default)]
pub struct Stamps(Option<Box<Box<[TagStamp]>>>);

impl Stamps {
    /// Heap bytes for `n` stamps: the slice, and the box holding its fat pointer.
    pub fn heap_size(n: usize) -> usize {
        if n == 0 {
            0
        } else {
            malloc_chunk(n * std::mem::size_of::<TagStamp>()) + malloc_chunk(16)
        }
    }
}

impl From<Vec<TagStamp>> for Stamps {
    fn from(v: Vec<TagStamp>) -> Self {
        Stamps((!v.is_empty()).then(|| Box::new(v.into_boxed_slice())))
    }
}

impl std::ops::Deref for Stamps {
    type Target = [TagStamp];

    #[inline]
    fn deref(&self) -> &[TagStamp] {
        self.0.as_deref().map_or(&[], |b| b)
    }
}

/// All stamps of an entry are current (an entry without tags is always current).
#[inline]
pub fn all_current(stamps: &[TagStamp]) -> bool {
    stamps.iter().all(TagStamp::is_current)
}

struct Cells {
    table: HashTable<Arc<TagCell>>,
    sweep_at: usize,
}

struct Shared {
    cells: Mutex<Cells>,
    hasher: RandomState,
    /// Bytes held by the table (see the module doc).
    bytes: AtomicU64,
}

impl Shared {
    fn hash(&self, name: &str) -> u64 {
        self.hasher.hash_one(name)
    }

    /// Forgets `cell` if the table and the caller's stamp are its only holders.
    fn release(&self, cell: &Arc<TagCell>) {
        let mut cells = self.cells.lock();
        if Arc::strong_count(cell) != 2 {
            return;
        }
        let found = cells
            .table
            .find_entry(self.hash(&cell.name), |c| Arc::ptr_eq(c, cell));
        let Ok(found) = found else {
            return; // reset took it out already
        };
        let (gone, _) = found.remove();
        drop(cells);
        self.forget(&gone);
    }

    /// Takes a cell out of the table's books (it is out of the table).
    fn forget(&self, cell: &TagCell) {
        // Uncontended: nobody else holds the cell.
        let mut members = cell.members.lock();
        let freed = TagCell::cost(cell.name.len()) + members.charged as u64;
        members.charged = 0;
        members.detached = true;
        drop(members);
        self.bytes.fetch_sub(freed, Ordering::Relaxed);
    }
}

pub struct TagTable(Arc<Shared>);

impl Default for TagTable {
    fn default() -> Self {
        TagTable(Arc::new(Shared {
            cells: Mutex::new(Cells {
                table: HashTable::new(),
                sweep_at: MIN_SWEEP,
            }),
            hasher: random_state(),
            bytes: AtomicU64::new(0),
        }))
    }
}

impl TagTable {
    /// Stamps for `names` at their current versions, creating cells as needed.
    pub fn stamps<'a>(&self, names: impl IntoIterator<Item = &'a str>) -> Vec<TagStamp> {
        let shared = &*self.0;
        let mut out: Vec<TagStamp> = Vec::new();
        let mut swept = Vec::new();
        let mut cells = shared.cells.lock();
        for name in names {
            let hash = shared.hash(name);
            let cell = match cells.table.find(hash, |c| *c.name == *name) {
                Some(c) => c.clone(),
                None => {
                    if cells.table.len() >= cells.sweep_at {
                        Self::sweep_locked(&mut cells, &mut swept);
                    }
                    // The member list has room for its first refs from the start, so that the
                    // bytes it takes are counted before the entry is stored (under MAX_BYTES).
                    let members = Members {
                        refs: Vec::with_capacity(FIRST_MEMBERS),
                        compact_at: MIN_COMPACT,
                        charged: malloc_chunk(FIRST_MEMBERS * size_of::<EntryRef>()),
                        detached: false,
                    };
                    let cost = TagCell::cost(name.len()) + members.charged as u64;
                    let c = Arc::new(TagCell {
                        version: AtomicU64::new(0),
                        name: name.into(),
                        table: Arc::downgrade(&self.0),
                        members: Mutex::new(members),
                    });
                    shared.bytes.fetch_add(cost, Ordering::Relaxed);
                    cells
                        .table
                        .insert_unique(hash, c.clone(), |c| shared.hash(&c.name));
                    c
                }
            };
            if !out.iter().any(|s| Arc::ptr_eq(&s.cell, &cell)) {
                let version = cell.version();
                out.push(TagStamp { cell, version });
            }
        }
        drop(cells);
        for c in &swept {
            shared.forget(c);
        }
        out
    }

    /// Takes the cells only the table holds out of it (into `swept`, to `forget` after unlocking).
    fn sweep_locked(cells: &mut Cells, swept: &mut Vec<Arc<TagCell>>) {
        cells.table.retain(|c| {
            let keep = Arc::strong_count(c) > 1;
            if !keep {
                swept.push(c.clone());
            }
            keep
        });
        cells.sweep_at = (cells.table.len() * 2).max(MIN_SWEEP);
    }

    /// Forgets every cell no stamp refers to now (`stamps` does it as the table grows).
    pub fn sweep(&self) {
        let mut swept = Vec::new();
        Self::sweep_locked(&mut self.0.cells.lock(), &mut swept);
        for c in &swept {
            self.0.forget(c);
        }
    }

    /// The cells of the tags that exist among `names`.
    pub fn existing<'a>(&self, names: impl IntoIterator<Item = &'a str>) -> Vec<Arc<TagCell>> {
        let shared = &*self.0;
        let cells = shared.cells.lock();
        names
            .into_iter()
            .filter_map(|n| cells.table.find(shared.hash(n), |c| *c.name == *n).cloned())
            .collect()
    }

    /// The current version of a tag (0 for a tag not held).
    pub fn version(&self, name: &str) -> u64 {
        let shared = &*self.0;
        let cells = shared.cells.lock();
        cells
            .table
            .find(shared.hash(name), |c| *c.name == *name)
            .map_or(0, |c| c.version())
    }

    /// Records `at` in `cell`'s member list, first compacting it (keeping the refs `live` says
    /// are still stored) when it is full, and counts the list's new size; returns the bytes the
    /// list grew by (0 if `make_room` made room for it before).
    pub fn add_member(
        &self,
        cell: &TagCell,
        at: EntryRef,
        live: impl Fn(&EntryRef) -> bool,
    ) -> u64 {
        let mut members = cell.members.lock();
        if members.detached {
            return 0; // forgotten by `reset`: every stamp of it is stale
        }
        Self::compact_if_due(&mut members, live);
        members.refs.push(at);
        self.recount(&mut members)
    }

    /// Makes room in `cell`'s member list for one more ref (compacting it first when due, as
    /// `add_member` would) and counts the list's new size. An insert calls it before it
    /// reserves its bytes, so that the reservation finds the growth its ref will need already
    /// on the books (and evicts for it) rather than charged after the insert, over the bound.
    /// Returns the bytes the list grew by.
    pub fn make_room(&self, cell: &TagCell, live: impl Fn(&EntryRef) -> bool) -> u64 {
        let mut members = cell.members.lock();
        if members.detached || members.refs.len() < members.refs.capacity() {
            return 0;
        }
        Self::compact_if_due(&mut members, live);
        // The growth `push` would make (Vec's amortized doubling), made now.
        members.refs.reserve(1);
        self.recount(&mut members)
    }

    /// Keeps only the refs `live` says are still stored once the list holds `compact_at` refs,
    /// then gives back room beyond twice its next threshold.
    fn compact_if_due(members: &mut Members, live: impl Fn(&EntryRef) -> bool) {
        if members.refs.len() >= members.compact_at {
            members.refs.retain(|r| live(r));
            let live = members.refs.len();
            members.compact_at = (live * 2).max(MIN_COMPACT);
            let room = members.compact_at;
            if members.refs.capacity() > 2 * room {
                members.refs.shrink_to(room);
            }
        }
    }

    /// Empties `cell`'s member list (freeing it), for an invalidation; returns the refs.
    pub fn take_members(&self, cell: &TagCell) -> Vec<EntryRef> {
        let mut members = cell.members.lock();
        let refs = std::mem::take(&mut members.refs);
        members.compact_at = MIN_COMPACT;
        if !members.detached {
            self.recount(&mut members);
        }
        refs
    }

    /// Counts the list's size now in the table's bytes; returns the bytes it grew by.
    fn recount(&self, members: &mut Members) -> u64 {
        let now = members.heap();
        let was = std::mem::replace(&mut members.charged, now);
        if now >= was {
            let grew = (now - was) as u64;
            self.0.bytes.fetch_add(grew, Ordering::Relaxed);
            grew
        } else {
            self.0
                .bytes
                .fetch_sub((was - now) as u64, Ordering::Relaxed);
            0
        }
    }

    /// Forgets every tag after bumping it, so that no entry stamped before can ever be current.
    pub fn reset(&self) {
        let shared = &*self.0;
        let table = std::mem::take(&mut shared.cells.lock().table);
        for cell in table.iter() {
            cell.bump();
            shared.forget(cell);
            cell.members.lock().refs = Vec::new();
        }
    }

    /// fork's prepare step (see `crate::fork`): takes the table, then every cell's member list,
    /// and keeps them locked.
    #[cfg(not(feature = "shuttle"))]
    pub fn lock_for_fork(&self) {
        let cells = self.0.cells.lock();
        for cell in cells.table.iter() {
            std::mem::forget(cell.members.lock());
        }
        std::mem::forget(cells);
    }

    /// Releases what `lock_for_fork` took.
    ///
    /// # Safety
    /// `lock_for_fork` ran in this thread (or in the thread of the parent that forked this child)
    /// and nothing released its locks since.
    #[cfg(not(feature = "shuttle"))]
    pub unsafe fn unlock_after_fork(&self) {
        // This thread holds the table's lock: nobody else reads or changes it.
        let cells = &*self.0.cells.data_ptr();
        for cell in cells.table.iter() {
            cell.members.force_unlock();
        }
        self.0.cells.force_unlock();
    }

    /// Tags held.
    pub fn len(&self) -> usize {
        self.0.cells.lock().table.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes the table holds: its cells, their names, slots and member lists.
    pub fn bytes(&self) -> u64 {
        self.0.bytes.load(Ordering::Relaxed)
    }
}

// Under `shuttle` the store's primitives work only inside a shuttle run: see the models.
#[cfg(all(test, not(feature = "shuttle")))]
mod tests {
    use super::*;

    #[test]
    fn stamps_go_stale_on_bump() {
        let t = TagTable::default();
        let s = t.stamps(["a", "b", "a"]);
        assert_eq!(s.len(), 2, "duplicate tags collapse");
        assert!(all_current(&s));
        for c in t.existing(["b", "zzz"]) {
            c.bump();
        }
        assert!(s[0].is_current());
        assert!(!s[1].is_current());
        assert!(!all_current(&s));
        assert_eq!(t.version("b"), 1);
        assert_eq!(t.version("never"), 0);
    }

    #[test]
    fn a_cell_is_forgotten_with_its_last_stamp_and_its_bytes_with_it() {
        let t = TagTable::default();
        let a = t.stamps(["a", "b"]);
        let b = t.stamps(["a"]);
        assert_eq!(t.len(), 2);
        let one = TagCell::cost(1) + malloc_chunk(FIRST_MEMBERS * 12) as u64;
        assert_eq!(t.bytes(), one * 2);
        drop(a);
        assert_eq!(t.len(), 1, "b had one stamp, gone; a is still held");
        assert_eq!(t.bytes(), one);
        drop(b);
        assert!(t.is_empty());
        assert_eq!(t.bytes(), 0);
    }

    #[test]
    fn a_held_stamp_keeps_its_cell_so_an_invalidation_is_never_lost() {
        let t = TagTable::default();
        let held = t.stamps(["x"]);
        for c in t.existing(["x"]) {
            c.bump();
        }
        drop(t.stamps(["x"]));
        assert!(
            !all_current(&held),
            "the invalidation stays visible to the old stamp"
        );
        assert_eq!(t.version("x"), 1);
        drop(held);
        // Forgotten: the tag starts afresh, neither invalidated for ever nor able to revive.
        assert!(t.is_empty());
        let fresh = t.stamps(["x"]);
        assert!(all_current(&fresh));
        assert_eq!(t.version("x"), 0);
    }

    #[test]
    fn member_lists_are_counted_compacted_and_freed() {
        let t = TagTable::default();
        let s = t.stamps(["m"]);
        let at = |slot| EntryRef {
            shard: 0,
            slot,
            gen: 1,
        };
        for i in 0..1000 {
            t.add_member(&s[0].cell, at(i), |r| r.slot % 100 == 0);
        }
        let list = t.bytes() - TagCell::cost(1);
        assert!(list > 0 && list < 1000 * size_of::<EntryRef>() as u64);
        assert!(t.take_members(&s[0].cell).len() as u64 * 12 <= list);
        assert_eq!(
            t.bytes(),
            TagCell::cost(1),
            "an invalidation frees the list"
        );
        drop(s);
        assert_eq!(t.bytes(), 0);
    }

    #[test]
    fn make_room_charges_the_growth_the_next_ref_needs_so_adding_it_charges_nothing() {
        let t = TagTable::default();
        let s = t.stamps(["m"]);
        let at = |slot| EntryRef {
            shard: 0,
            slot,
            gen: 1,
        };
        let cell = &s[0].cell;
        let mut grew = 0;
        for i in 0..100 {
            let before = t.bytes();
            t.make_room(cell, |_| true);
            let room = t.bytes() - before;
            grew += u64::from(room > 0);
            // Room made: the ref goes in without charging a byte more.
            assert_eq!(t.add_member(cell, at(i), |_| true), 0, "ref {i}");
            assert_eq!(t.bytes(), before + room);
        }
        assert!(grew >= 4, "the list grew {grew} times");
        // Without it, adding to a full list charges the growth (what `fit` then evicts for).
        let is_full = || {
            let m = cell.members.lock();
            m.refs.len() == m.refs.capacity()
        };
        let mut i = 100;
        while !is_full() {
            t.add_member(cell, at(i), |_| true);
            i += 1;
        }
        assert!(t.add_member(cell, at(i), |_| true) > 0);
        // An invalidated cell's list, freed, takes its first room again.
        t.take_members(cell);
        let before = t.bytes();
        t.make_room(cell, |_| true);
        assert_eq!(t.bytes(), before + malloc_chunk(FIRST_MEMBERS * 12) as u64);
        assert_eq!(t.add_member(cell, at(1), |_| true), 0);
    }

    #[test]
    fn cells_whose_stamps_went_together_are_swept() {
        let t = TagTable::default();
        // Make cells held only by the table (as two stamps dropped at once may leave them).
        for i in 0..3 * MIN_SWEEP {
            let s = t.stamps([format!("t{i}").as_str()]);
            let cell = s[0].cell.clone();
            drop(s); // two holders left: the table and `cell`, which is no stamp
            drop(cell);
        }
        assert!(t.len() <= MIN_SWEEP + 1, "{} cells", t.len());
        let list = malloc_chunk(FIRST_MEMBERS * 12) as u64;
        assert_eq!(t.bytes(), t.len() as u64 * (TagCell::cost(5) + list));
    }

    #[test]
    fn reset_kills_old_stamps() {
        let t = TagTable::default();
        let s = t.stamps(["x"]);
        t.reset();
        assert_eq!(t.len(), 0);
        assert_eq!(t.bytes(), 0);
        assert!(!s[0].is_current());
        let fresh = t.stamps(["x"]);
        assert!(fresh[0].is_current());
    }
}
