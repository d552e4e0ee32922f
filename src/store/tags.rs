//! Tag bookkeeping: recording an entry in its tags' member lists (`register`, `moved_on`) and
//! `invalidate_tags`, which reclaims the entries listed there.

use super::*;

impl<V: Weigh> Store<V> {
    /// After an entry of shard `idx` got a new generation (`moved`: its slot, the generation and
    /// its stamps): records it under its tags again, so that invalidating one reclaims it.
    pub(super) fn moved_on(&self, idx: usize, moved: Option<(u32, u32, Vec<TagStamp>)>) {
        if let Some((slot, gen, stamps)) = moved.filter(|m| !m.2.is_empty()) {
            let at = EntryRef {
                shard: idx as u32,
                slot,
                gen,
            };
            self.register(at, &stamps);
        }
    }

    /// Makes every entry carrying one of `names` a miss and reclaims those entries; returns how
    /// many live entries it removed. Cost: the number of tags plus the entries that carried them.
    pub fn invalidate_tags<'a>(&self, names: impl IntoIterator<Item = &'a str>, now: u64) -> usize {
        let mut refs: Vec<EntryRef> = Vec::new();
        for cell in self.tags.existing(names) {
            cell.bump();
            refs.append(&mut self.tags.take_members(&cell));
        }
        refs.sort_unstable_by_key(|r| (r.shard, r.slot));
        let mut removed = 0;
        for group in refs.chunk_by(|a, b| a.shard == b.shard) {
            let mut shard = self.write(group[0].shard as usize);
            for r in group {
                if shard.entry_if(r.slot, r.gen).is_some() {
                    let e = self.detach(&mut shard, r.slot);
                    if !e.is_expired(now) {
                        removed += 1;
                    }
                    shard.bury(e);
                }
            }
        }
        Stats::bump(&self.stats.invalidations, removed as u64);
        removed
    }

    /// Records `at` in the member lists of its tags, compacting a list that filled with stale refs.
    pub(super) fn register(&self, at: EntryRef, stamps: &[TagStamp]) {
        for stamp in stamps {
            self.tags.add_member(&stamp.cell, at, |r| {
                let shard = self.shards[r.shard as usize].read();
                shard.entry_if(r.slot, r.gen).is_some()
            });
        }
    }
}

// Under `shuttle` the store's primitives work only inside a shuttle run: see the models.
#[cfg(all(test, not(feature = "shuttle")))]
mod tests {
    use std::thread;

    use super::*;
    use crate::clock::NEVER;
    use crate::store::testing::*;

    #[test]
    fn a_tag_per_row_is_forgotten_with_its_rows_and_bounded_by_max_bytes() {
        for policy in [Policy::Lru, Policy::S3Fifo] {
            let store: Store<Val> = Store::with_policy(1, policy);
            let lim = limits(100, Some(40_000));
            for i in 0..100_000u64 {
                let key = format!("k{i}");
                let stamps = store.tags.stamps([format!("row:{i}").as_str()]);
                let now = i * SEC / 1000;
                store.set(&key, Val(10), now + SEC / 100, stamps, &lim, now);
                if i % 7 == 0 {
                    store.invalidate_tags([format!("row:{}", i - i % 5).as_str()], now);
                }
                assert!(
                    store.bytes() <= 40_000,
                    "{policy:?}: {} bytes",
                    store.bytes()
                );
            }
            assert!(
                store.tags.len() <= 101,
                "{policy:?}: {} tags",
                store.tags.len()
            );
            let sum: u64 = store.shards[0].read().iter().map(Store::charge).sum();
            assert_eq!(store.bytes(), sum + store.tags.bytes() + ghost(&store));
            store.clear();
            assert_eq!((store.bytes(), store.tags.len()), (0, 0));
        }
    }

    #[test]
    fn threads_sharing_tags_never_see_an_invalidated_entry_and_leave_no_tag_behind() {
        let store: Store<Val> = Store::new(4);
        let lim = limits(1_000, Some(200_000));
        thread::scope(|s| {
            for t in 0..4u64 {
                let store = &store;
                s.spawn(move || {
                    for i in 0..20_000u64 {
                        let tag = format!("t{}", i % 16);
                        let key = format!("k{t}:{}", i % 64);
                        let stamps = store.tags.stamps([tag.as_str(), "all"]);
                        store.set(&key, Val(i as usize), NEVER, stamps, &lim, 1);
                        if i % 5 == 0 {
                            store.invalidate_tags([tag.as_str()], 1);
                            // Whatever other threads drop meanwhile, the entry stays invalid.
                            assert!(store.get(&key, 1, |_| ()).is_none(), "{key} revived");
                        } else if i % 3 == 0 {
                            store.delete(&key, 1);
                        }
                    }
                });
            }
        });
        store.invalidate_tags(["all"], 1);
        assert!(store.is_empty());
        // Left: only cells whose last two stamps went at once (each saw the other), counted,
        // until a sweep, which finds nothing else holding them.
        assert_eq!(store.bytes(), store.tags.bytes());
        store.tags.sweep();
        assert_eq!((store.bytes(), store.tags.len()), (0, 0));
        store.clear();
        assert_eq!((store.bytes(), store.tags.len()), (0, 0));
    }
}

/// Tag invalidation under shuttle's scheduler (`crate::sync`), in thousands of seeded, replayable
/// interleavings. Run: `cargo test --no-default-features --features shuttle store::tags`.
#[cfg(all(test, feature = "shuttle"))]
mod shuttle_tests {
    use super::*;
    use crate::clock::NEVER;
    use crate::store::testing::model::{books, check, Num, Tally};
    use crate::store::testing::*;
    use crate::sync::atomic::{AtomicBool, Ordering::SeqCst};
    use crate::sync::{scope, yield_now};

    const ITERATIONS: usize = 3_000;

    /// A writer stores `k` under a stamp of tag `t` taken before the invalidation starts, while
    /// another thread takes and drops stamps of `t` (so the table may forget the tag's cell and
    /// make a new one) and a third invalidates `t`: once `invalidate_tags` has returned, `k` is
    /// never read again, whenever its write lands. A write stamped after the invalidation stays.
    /// At the end, invalidating `t` again leaves nothing behind.
    fn invalidation(policy: Policy) {
        let tally = Tally::default();
        let store: Store<Num> = Store::with_policy(2, policy);
        let lim = limits(100, None);
        let stamped = AtomicBool::new(false);
        let invalidated = AtomicBool::new(false);
        let wait = |flag: &AtomicBool| {
            while !flag.load(SeqCst) {
                yield_now();
            }
        };
        scope(|s| {
            s.spawn(|| {
                let stamps = store.tags.stamps(["t"]);
                stamped.store(true, SeqCst);
                let put = store.set("k", tally.num(1, 8), NEVER, stamps, &lim, 1);
                assert!(matches!(put, Put::Stored | Put::Stale), "{put:?}");
            });
            s.spawn(|| {
                drop(store.tags.stamps(["t"]));
                drop(store.tags.stamps(["t"]));
            });
            s.spawn(|| {
                wait(&stamped);
                store.invalidate_tags(["t"], 1);
                invalidated.store(true, SeqCst);
                let got = store.get("k", 1, |v| v.n);
                assert_eq!(got, None, "read a value stamped before the invalidation");
            });
            s.spawn(|| {
                wait(&invalidated);
                let stamps = store.tags.stamps(["t"]);
                let put = store.set("k2", tally.num(2, 8), NEVER, stamps, &lim, 1);
                assert_eq!(put, Put::Stored);
            });
        });
        assert_eq!(
            store.get("k", 1, |v| v.n),
            None,
            "the invalidated write came back"
        );
        assert_eq!(store.get("k2", 1, |v| v.n), Some(2));
        assert_eq!(store.bytes(), books(&store));
        assert_eq!(store.invalidate_tags(["t"], 1), 1);
        assert_eq!((store.len(), held(&store), tally.alive()), (0, 0, 0));
        store.tags.sweep();
        assert_eq!((store.bytes(), store.tags.len()), (0, 0));
    }

    #[test]
    fn lru_no_read_after_an_invalidation_sees_a_value_stamped_before_it() {
        check(ITERATIONS, || invalidation(Policy::Lru));
    }

    #[test]
    fn s3_no_read_after_an_invalidation_sees_a_value_stamped_before_it() {
        check(ITERATIONS, || invalidation(Policy::S3Fifo));
    }
}
