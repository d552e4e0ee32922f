//! Tag bookkeeping: recording an entry in its tags' member lists (`register`, `moved_on`) and
//! `invalidate_tags`, which reclaims the entries listed there.

use super::*;

impl<V: Weigh> Store<V> {
    /// After an entry of shard `idx` got a new generation (`moved`: its slot, the generation and
    /// its stamps): records it under its tags again, so that invalidating one reclaims it, and
    /// evicts for the room that took (see `fit`).
    pub(super) fn moved_on(
        &self,
        idx: usize,
        moved: Option<(u32, u32, Vec<TagStamp>)>,
        limits: &Limits,
        now: u64,
    ) {
        if let Some((slot, gen, stamps)) = moved.filter(|m| !m.2.is_empty()) {
            let at = EntryRef {
                shard: idx as u32,
                slot,
                gen,
            };
            if self.register(at, &stamps) > 0 {
                self.fit(limits, now, idx);
            }
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
        let (mut removed, mut expired) = (0, 0);
        for group in refs.chunk_by(|a, b| a.shard == b.shard) {
            let mut shard = self.write(group[0].shard as usize);
            for r in group {
                if shard.entry_if(r.slot, r.gen).is_some() {
                    let e = self.detach(&mut shard, r.slot);
                    // An entry past its deadline counts as an expiration, as a read, a sweep or
                    // an eviction that took it would count it.
                    if e.is_expired(now) {
                        expired += 1;
                    } else {
                        removed += 1;
                    }
                    shard.bury(e);
                }
            }
        }
        Stats::bump(&self.stats.invalidations, removed as u64);
        Stats::bump(&self.stats.expirations, expired);
        removed
    }

    /// Records `at` in the member lists of its tags, compacting a list that filled with stale
    /// refs; returns the bytes the lists grew by (none if `make_room` ran for them before).
    pub(super) fn register(&self, at: EntryRef, stamps: &[TagStamp]) -> u64 {
        stamps
            .iter()
            .map(|stamp| self.tags.add_member(&stamp.cell, at, |r| self.is_stored(r)))
            .sum()
    }

    /// Makes room in the member lists of `stamps` for one more ref each, before an insert
    /// reserves its bytes: the reservation then covers the lists' growth (see
    /// `TagTable::make_room`); returns the bytes that took. Takes shard read locks: call it
    /// holding none.
    pub(super) fn make_room(&self, stamps: &[TagStamp]) -> u64 {
        stamps
            .iter()
            .map(|stamp| self.tags.make_room(&stamp.cell, |r| self.is_stored(r)))
            .sum()
    }

    /// Whether the entry `r` refers to is still stored (a member list's compaction keeps it).
    fn is_stored(&self, r: &EntryRef) -> bool {
        let shard = self.shards[r.shard as usize].read();
        shard.entry_if(r.slot, r.gen).is_some()
    }

    /// Evicts, from shard `idx` on, while the store is over `limits.max_bytes` and has entries
    /// left: for bytes charged after the fact, which no reservation covered (a member list that
    /// grew because a concurrent insert took the room made for this one, or the new ref of an
    /// in-place update), so that the bound holds again once the operation returns.
    pub(super) fn fit(&self, limits: &Limits, now: u64, idx: usize) {
        let Some(max) = limits.max_bytes else { return };
        while self.bytes() > max && self.evict_one(idx, now) {}
    }

    /// Evicts while the store is over `limits.max_bytes` and has entries left: after taking
    /// stamps that are kept beyond the operation (a tag snapshot), whose new cells are charged
    /// as they are made, with no insert to reserve for them.
    pub fn keep_within(&self, limits: &Limits, now: u64) {
        self.fit(limits, now, 0);
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
    fn a_stale_tag_ref_never_matches_a_later_entry_at_the_same_slot() {
        for policy in [Policy::Lru, Policy::S3Fifo, Policy::TinyLfu] {
            for successor_tagged in [false, true] {
                let store: Store<Val> = Store::with_policy(1, policy);
                let lim = limits(100, None);
                let slot_of = |k| store.shards[0].read().find(store.locate(k).0, k);
                let tagged = |k: &str, tag: &str| {
                    let stamps = store.tags.stamps([tag]);
                    store.set(k, Val(10), NEVER, stamps, &lim, 1)
                };
                let why = format!("{policy:?} successor tagged {successor_tagged}");
                // `keep` keeps t alive (a tag nobody carries is forgotten with its list).
                tagged("keep", "t");
                tagged("k", "t");
                let slot = slot_of("k");
                // Deleted (its ref stays in t's list) and stored again at the same slot,
                // under another tag or none.
                assert!(store.delete("k", 1));
                if successor_tagged {
                    tagged("k", "u");
                } else {
                    set(&store, "k", 10, &lim, 1);
                }
                assert_eq!(slot_of("k"), slot, "{why}");
                assert_eq!(store.invalidate_tags(["t"], 1), 1, "{why}");
                assert!(
                    store.contains("k", 1),
                    "{why}: a stale ref removed a later entry"
                );
                // The same for an entry of another key at the slot, after an update too.
                tagged("keep", "t");
                assert!(store.delete("k", 1));
                tagged("k", "t");
                let slot = slot_of("k");
                assert!(store.delete("k", 1));
                tagged("other", "u");
                assert_eq!(slot_of("other"), slot, "{why}");
                assert_eq!(store.update("other", &lim, 1, |_| Some(())), Ok(Some(())));
                assert_eq!(store.invalidate_tags(["t"], 1), 1, "{why}");
                assert!(store.contains("other", 1), "{why}");
                // A live ref still reclaims its entry, after an update too.
                assert_eq!(store.invalidate_tags(["u"], 1), 1, "{why}");
                assert!(!store.contains("other", 1));
            }
        }
    }

    /// The store is within `max` bytes and its books add up.
    #[track_caller]
    fn within(store: &Store<Val>, max: u64, policy: Policy) {
        assert!(
            store.bytes() <= max,
            "{policy:?}: {} > {max}",
            store.bytes()
        );
        assert_eq!(store.bytes(), books(store), "{policy:?}");
    }

    /// A store of one shard holding four entries under tag "g" (whose member list is then full)
    /// and a bound of exactly those bytes plus `room`.
    fn full_list(policy: Policy, room: u64) -> (Store<Val>, Limits) {
        let store: Store<Val> = Store::with_policy(1, policy);
        let open = limits(100, None);
        for i in 0..4 {
            let stamps = store.tags.stamps(["g"]);
            store.set(&format!("k{i}"), Val(10), NEVER, stamps, &open, 1);
        }
        let lim = limits(100, Some(store.bytes() + room));
        (store, lim)
    }

    #[test]
    fn an_insert_whose_tag_list_must_grow_stays_within_max_bytes() {
        for policy in [Policy::Lru, Policy::S3Fifo, Policy::TinyLfu] {
            // The fifth entry fits exactly; the ref it adds to g's full list does not.
            let (store, lim) = full_list(policy, Store::<Val>::weigh("k4", &Val(10), 1, NEVER));
            let max = lim.max_bytes.unwrap();
            let stamps = store.tags.stamps(["g"]);
            assert_eq!(
                store.set("k4", Val(10), NEVER, stamps, &lim, 1),
                Put::Stored
            );
            within(&store, max, policy);
            assert!(store.contains("k4", 1), "{policy:?}: evicted the new entry");
            assert_eq!(store.stats.snapshot().evictions, 1, "{policy:?}");
            // Invalidating the tag reclaims them all and frees the list.
            assert_eq!(store.invalidate_tags(["g"], 1), 4, "{policy:?}");
            assert_eq!(store.len(), 0);
        }
    }

    #[test]
    fn a_tagged_insert_that_stores_nothing_stays_within_max_bytes() {
        for policy in [Policy::Lru, Policy::S3Fifo, Policy::TinyLfu] {
            let (store, lim) = full_list(policy, 0);
            let max = lim.max_bytes.unwrap();
            // Already expired: stored as nothing, and no room is made for it.
            let stamps = store.tags.stamps(["g"]);
            assert_eq!(store.set("k9", Val(10), 1, stamps, &lim, 5), Put::Stored);
            within(&store, max, policy);
            assert_eq!(store.stats.snapshot().evictions, 0, "{policy:?}");
            // A fill whose placeholder is gone stores nothing; the room it made is evicted for.
            let stamps = store.tags.stamps(["g"]);
            let put = store.fill_put("k9", 12_345, Val(10), NEVER, stamps, false, &lim, 1);
            assert_eq!(put, Put::Stale, "{policy:?}");
            within(&store, max, policy);
        }
    }

    #[test]
    fn an_in_place_update_of_a_tagged_entry_stays_within_max_bytes() {
        for policy in [Policy::Lru, Policy::S3Fifo, Policy::TinyLfu] {
            // An update gives the entry a new generation, recorded under its tags again: a
            // fifth ref in g's full list.
            let (store, lim) = full_list(policy, 0);
            let max = lim.max_bytes.unwrap();
            assert_eq!(store.update("k3", &lim, 1, |_| Some(())), Ok(Some(())));
            within(&store, max, policy);
            // So does replace_if (incr of a value that cannot change in place).
            let (store, lim) = full_list(policy, 0);
            let (_, gen) = store.snapshot("k3", 1, |e| e.value().0).unwrap();
            let done = store.replace_if("k3", gen, Val(10), &lim, 1);
            // (W-TinyLFU's victim for the room may be the newest entry, this one.)
            if policy == Policy::TinyLfu && done == Replace::Missing {
                assert!(!store.contains("k3", 1));
            } else {
                assert_eq!(done, Replace::Done, "{policy:?}");
                assert!(
                    store.contains("k3", 1),
                    "{policy:?}: lost the entry it replaced"
                );
            }
            within(&store, max, policy);
        }
    }

    #[test]
    fn stamps_kept_beyond_an_operation_are_evicted_for() {
        for policy in [Policy::Lru, Policy::S3Fifo, Policy::TinyLfu] {
            let (store, lim) = full_list(policy, 0);
            let max = lim.max_bytes.unwrap();
            // A snapshot of new tags: their cells are charged as they are made.
            let held = store.tags.stamps(["s1", "s2"]);
            assert!(store.bytes() > max);
            store.keep_within(&lim, 1);
            within(&store, max, policy);
            assert!(store.stats.snapshot().evictions >= 1);
            drop(held);
        }
    }

    #[test]
    fn an_entry_whose_new_tag_does_not_fit_even_alone_is_too_large() {
        for policy in [Policy::Lru, Policy::S3Fifo, Policy::TinyLfu] {
            let store: Store<Val> = Store::with_policy(1, policy);
            // The entry alone fits exactly; with its tag's cell and member list it cannot.
            let max = Store::<Val>::weigh("k", &Val(100), 1, NEVER);
            let lim = limits(100, Some(max));
            let stamps = store.tags.stamps(["new"]);
            assert_eq!(
                store.set("k", Val(100), NEVER, stamps, &lim, 1),
                Put::TooLarge,
                "{policy:?}"
            );
            assert_eq!((store.len(), store.bytes()), (0, 0), "{policy:?}");
            // Without the tag it goes in.
            assert_eq!(
                store.set("k", Val(100), NEVER, Vec::new(), &lim, 1),
                Put::Stored
            );
            assert_eq!(store.bytes(), Store::<Val>::weigh("k", &Val(100), 0, NEVER));
            // ... and a tagged write that cannot fit leaves no older value behind.
            let stamps = store.tags.stamps(["new"]);
            assert_eq!(
                store.set("k", Val(100), NEVER, stamps, &lim, 1),
                Put::TooLarge
            );
            assert!(!store.contains("k", 1), "{policy:?}");
            assert_eq!((store.len(), store.bytes()), (0, 0), "{policy:?}");
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
