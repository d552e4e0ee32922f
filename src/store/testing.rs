//! What the store's tests share: a value of a given weight and small constructors.

use super::*;
pub(super) use crate::clock::NEVER;

/// A small deterministic generator (xorshift64*), so that the randomized tests (the store's
/// model, the shard's) are seeded without a dependency.
pub(crate) struct Rng(pub(crate) u64);

impl Rng {
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) % n
    }
}

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

/// Bytes the store's books must show: its entries' charges, S3-FIFO's ghost records,
/// W-TinyLFU's sketches and the tag table. Each shard is read under one hold of its lock:
/// in a store of one shard, this is what the store held at one moment.
pub(super) fn books<V: Weigh>(store: &Store<V>) -> u64 {
    let shards: u64 = store
        .shards
        .iter()
        .map(|s| {
            let s = s.read();
            let entries: u64 = s.iter().map(Store::charge).sum();
            entries + (s.ghost.records() * GHOST_RECORD + s.tiny.sketch.bytes()) as u64
        })
        .sum();
    shards + store.tags.bytes()
}

/// What the shuttle models share: a runner, and a value that counts its drops.
#[cfg(feature = "shuttle")]
pub(super) mod model {
    use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};

    pub(in crate::store) use super::books;
    use super::*;
    use crate::sync::Arc;

    /// Runs `model` under `iterations` schedules of shuttle's random scheduler, then as many of
    /// its PCT scheduler (which favours the few badly placed preemptions that break a protocol).
    /// Shuttle treats every atomic as `SeqCst`, so its warning about the store's relaxed counters
    /// is silenced (see `crate::sync`).
    pub(in crate::store) fn check(iterations: usize, model: impl Fn() + Send + Sync + 'static) {
        use shuttle::scheduler::{PctScheduler, RandomScheduler};
        let model = Arc::new(model);
        let mut config = shuttle::Config::new();
        config.silence_warnings = true;
        let m = model.clone();
        shuttle::Runner::new(RandomScheduler::new(iterations), config.clone()).run(move || m());
        shuttle::Runner::new(PctScheduler::new(3, iterations), config).run(move || model());
    }

    /// Values made and dropped, for checking that every value is dropped exactly once.
    #[derive(Clone, Default)]
    pub(in crate::store) struct Tally(Arc<(AtomicUsize, AtomicUsize)>);

    impl Tally {
        /// A value `n` weighing `weight` bytes.
        pub(in crate::store) fn num(&self, n: u64, weight: usize) -> Num {
            self.0 .0.fetch_add(1, SeqCst);
            Num {
                n,
                weight,
                tally: self.clone(),
            }
        }

        /// Values made and not yet dropped.
        pub(in crate::store) fn alive(&self) -> usize {
            let (made, dropped) = (self.0 .0.load(SeqCst), self.0 .1.load(SeqCst));
            assert!(dropped <= made, "a value was dropped twice");
            made - dropped
        }
    }

    /// A model's value: a number, weighing a fixed number of bytes.
    pub(in crate::store) struct Num {
        pub(in crate::store) n: u64,
        weight: usize,
        tally: Tally,
    }

    impl Drop for Num {
        fn drop(&mut self) {
            self.tally.0 .1.fetch_add(1, SeqCst);
        }
    }

    impl Weigh for Num {
        fn weight(&self) -> usize {
            self.weight
        }
    }

    impl Pack for Num {
        fn from_tag(_: u8) -> &'static Self {
            unreachable!("Num is never tagged")
        }
    }
}
