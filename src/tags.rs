//! Tag versions: every tag is a cell with a version number; an entry remembers the versions of its
//! tags when it is stored and is a miss as soon as any of them has moved on.
//!
//! Invalidating a tag is one atomic increment, whatever the size of the store. Each cell also keeps
//! the list of entries stored under it so that their memory can be reclaimed right away (without a
//! scan of the store); that list is compacted when it fills with references to entries that are gone.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use ahash::RandomState;
use hashbrown::HashMap;
use parking_lot::Mutex;

use crate::mem::malloc_chunk;

/// Where an entry lives: shard, slot and the generation stamped on it when it was stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct EntryRef {
    pub shard: u32,
    pub slot: u32,
    pub gen: u32,
}

pub struct Members {
    pub refs: Vec<EntryRef>,
    /// Compact when `refs` grows past this; doubles after each compaction so it stays amortized O(1).
    pub compact_at: usize,
}

pub struct TagCell {
    version: AtomicU64,
    pub members: Mutex<Members>,
}

impl TagCell {
    fn new() -> Self {
        TagCell {
            version: AtomicU64::new(0),
            members: Mutex::new(Members {
                refs: Vec::new(),
                compact_at: 64,
            }),
        }
    }

    #[inline]
    pub fn version(&self) -> u64 {
        self.version.load(Ordering::Acquire)
    }

    /// Moves the version on: every entry stamped with an older one becomes a miss.
    pub fn bump(&self) {
        self.version.fetch_add(1, Ordering::AcqRel);
    }
}

/// An entry's record of one tag: the cell and the version it had when the entry was stored.
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

#[derive(Default)]
pub struct TagTable {
    cells: Mutex<HashMap<Box<str>, Arc<TagCell>, RandomState>>,
}

impl TagTable {
    /// Stamps for `names` at their current versions, creating cells as needed.
    pub fn stamps<'a>(&self, names: impl IntoIterator<Item = &'a str>) -> Vec<TagStamp> {
        let mut cells = self.cells.lock();
        let mut out: Vec<TagStamp> = Vec::new();
        for name in names {
            let cell = match cells.get(name) {
                Some(c) => c.clone(),
                None => {
                    let c = Arc::new(TagCell::new());
                    cells.insert(name.into(), c.clone());
                    c
                }
            };
            if !out.iter().any(|s| Arc::ptr_eq(&s.cell, &cell)) {
                let version = cell.version();
                out.push(TagStamp { cell, version });
            }
        }
        out
    }

    /// The cells of the tags that exist among `names`.
    pub fn existing<'a>(&self, names: impl IntoIterator<Item = &'a str>) -> Vec<Arc<TagCell>> {
        let cells = self.cells.lock();
        names
            .into_iter()
            .filter_map(|n| cells.get(n).cloned())
            .collect()
    }

    /// The current version of a tag (0 for a tag never seen).
    pub fn version(&self, name: &str) -> u64 {
        self.cells.lock().get(name).map_or(0, |c| c.version())
    }

    /// Forgets every tag after bumping it, so that no entry stamped before can ever be current.
    pub fn reset(&self) {
        let mut cells = self.cells.lock();
        for cell in cells.values() {
            cell.bump();
            cell.members.lock().refs.clear();
        }
        cells.clear();
    }

    /// fork's prepare step (see `crate::fork`): takes the table, then every cell's member list,
    /// and keeps them locked.
    pub fn lock_for_fork(&self) {
        let cells = self.cells.lock();
        for cell in cells.values() {
            std::mem::forget(cell.members.lock());
        }
        std::mem::forget(cells);
    }

    /// Releases what `lock_for_fork` took.
    ///
    /// # Safety
    /// `lock_for_fork` ran in this thread (or in the thread of the parent that forked this child)
    /// and nothing released its locks since.
    pub unsafe fn unlock_after_fork(&self) {
        // This thread holds the table's lock: nobody else reads or changes it.
        let cells = &*self.cells.data_ptr();
        for cell in cells.values() {
            cell.members.force_unlock();
        }
        self.cells.force_unlock();
    }

    pub fn len(&self) -> usize {
        self.cells.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
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
    fn reset_kills_old_stamps() {
        let t = TagTable::default();
        let s = t.stamps(["x"]);
        t.reset();
        assert_eq!(t.len(), 0);
        assert!(!s[0].is_current());
        let fresh = t.stamps(["x"]);
        assert!(fresh[0].is_current());
    }
}
