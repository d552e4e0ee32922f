//! What the store's tests share: a value of a given weight and small constructors.

use super::*;

/// A value weighing `.0` bytes.
pub(super) struct Val(pub(super) usize);

impl Weigh for Val {
    fn weight(&self) -> usize {
        self.0
    }
}

impl Pack for Val {
    fn from_tag(_: u8) -> &'static Self {
        unreachable!("Val is never tagged")
    }
}

/// A second in clock nanoseconds (deadlines are kept to the millisecond).
pub(super) const SEC: u64 = 1_000_000_000;

pub(super) fn limits(max_entries: i64, max_bytes: Option<u64>) -> Limits {
    Limits {
        max_entries,
        cull_frequency: 3,
        max_bytes,
    }
}

pub(super) fn s3(shards: usize) -> Store<Val> {
    Store::with_policy(shards, Policy::S3Fifo)
}

/// Entries really held, counted shard by shard (`len` also counts places being filled).
pub(super) fn held<V: Weigh>(store: &Store<V>) -> usize {
    store.shards.iter().map(|s| s.read().len()).sum()
}

pub(super) fn set(store: &Store<Val>, key: &str, weight: usize, lim: &Limits, now: u64) -> Put {
    store.set(key, Val(weight), NEVER, Vec::new(), lim, now)
}

/// Bytes charged for S3-FIFO's ghost records.
pub(super) fn ghost<V: Weigh>(store: &Store<V>) -> u64 {
    let records: usize = store.shards.iter().map(|s| s.read().ghost.records()).sum();
    (records * GHOST_RECORD) as u64
}
