//! Writes: `set`/`add` (the "lru" path; S3-FIFO's is `evict.rs`'s `put_s3`), `delete`, `touch`,
//! `update`, `replace_if`, `set_delta` and `clear`.

use crate::sync::atomic::Ordering::Relaxed;

use super::*;

impl<V: Weigh> Store<V> {
    /// Records that computing the live value under `key` took `delta` nanoseconds, if the entry
    /// is still the one just stored (same expiry stamp) and the few bytes the record takes fit
    /// under `limits.max_bytes`; false otherwise.
    pub fn set_delta(
        &self,
        key: &str,
        expires: u64,
        delta: u64,
        limits: &Limits,
        now: u64,
    ) -> bool {
        let (hash, idx) = self.locate(key);
        let mut shard = self.write(idx);
        let out = match self.lookup(&mut shard, hash, key, now) {
            Lookup::Live(slot) if shard.entry(slot).expires() == rounded_deadline(expires) => {
                let old = Self::charge(shard.entry(slot));
                shard.replace_with(slot, |e| e.with_delta(delta));
                let new = Self::charge(shard.entry(slot));
                if self.recharge(old, new, limits) {
                    true
                } else {
                    shard.replace_with(slot, |e| e.with_delta(0));
                    false
                }
            }
            _ => false,
        };
        drop(shard);
        out
    }

    /// Removes the entry; true if a live one was there.
    pub fn delete(&self, key: &str, now: u64) -> bool {
        let (hash, idx) = self.locate(key);
        let mut shard = self.write(idx);
        self.fill_take(idx, key, None, now);
        let out = match self.lookup(&mut shard, hash, key, now) {
            Lookup::Live(slot) => {
                let e = self.detach(&mut shard, slot);
                shard.bury(e);
                Stats::bump(&self.stats.deletes, 1);
                true
            }
            Lookup::Absent => false,
        };
        drop(shard);
        self.sweep_next(now);
        out
    }

    /// Gives a live entry a new expiry (a past one removes it); false if missing.
    ///
    /// A deadline beyond the header's 49 days takes a tail in a new block, which may change the
    /// entry's charge. A gain is charged only if it fits under `limits.max_bytes` (touch evicts
    /// nothing); if it does not, the entry keeps its old charge, short by that much.
    pub fn touch(&self, key: &str, expires: u64, limits: &Limits, now: u64) -> bool {
        let (hash, idx) = self.locate(key);
        let mut shard = self.write(idx);
        let out = match self.lookup(&mut shard, hash, key, now) {
            Lookup::Live(slot) => {
                if expires <= now {
                    let e = self.detach(&mut shard, slot);
                    shard.bury(e);
                } else {
                    let old = Self::charge(shard.entry(slot));
                    shard.set_expiry(slot, expires);
                    if shard.entry(slot).fixed_weight().is_some() {
                        // A charge fixed by an earlier touch: see whether the derived one fits now.
                        shard.replace_with(slot, |e| {
                            let (expires, delta) = (e.expires(), e.delta());
                            e.reshaped(expires, delta, None)
                        });
                    }
                    let new = Self::charge(shard.entry(slot));
                    if !self.recharge(old, new, limits) {
                        // Keep the old charge, recorded with the entry (it no longer follows).
                        shard.replace_with(slot, |e| {
                            let (expires, delta) = (e.expires(), e.delta());
                            e.reshaped(expires, delta, Some(old as u32))
                        });
                    }
                }
                true
            }
            Lookup::Absent => false,
        };
        drop(shard);
        out
    }

    /// Changes the live value in place when `update` can (it returns `Some`), keeping expiry and
    /// tags and marking it recently used. `Err(())` if the key is missing; `Ok(None)` if `update`
    /// declined (the caller then goes through `snapshot` and `replace_if`). The value's weight
    /// must not change. The entry's new generation is recorded under its tags, which may grow
    /// a member list: `limits.max_bytes` is then kept by evicting other entries.
    #[allow(clippy::result_unit_err)]
    pub fn update<R>(
        &self,
        key: &str,
        limits: &Limits,
        now: u64,
        update: impl FnOnce(&mut V) -> Option<R>,
    ) -> Result<Option<R>, ()> {
        let (hash, idx) = self.locate(key);
        let mut moved = None;
        let mut shard = self.write(idx);
        self.fill_take(idx, key, None, now);
        let out = match self.lookup(&mut shard, hash, key, now) {
            Lookup::Live(slot) => {
                let r = shard.entry_mut(slot).value_mut().and_then(update);
                if r.is_some() {
                    let gen = self.next_gen();
                    self.used(&mut shard, slot, hash);
                    shard.note_write();
                    shard.entry_mut(slot).set_gen(gen);
                    moved = Some((slot, gen, shard.entry(slot).tags().to_vec()));
                }
                Ok(r)
            }
            Lookup::Absent => Err(()),
        };
        drop(shard);
        self.moved_on(idx, moved, limits, now);
        out
    }

    /// Stores `key`, replacing any entry. A deadline already past removes the key instead.
    pub fn set(
        &self,
        key: &str,
        value: V,
        expires: u64,
        tags: Vec<TagStamp>,
        limits: &Limits,
        now: u64,
    ) -> Put {
        self.put(key, value, expires, tags, limits, now, false, None)
    }

    /// Stores `key` only if no live entry has it.
    pub fn add(
        &self,
        key: &str,
        value: V,
        expires: u64,
        tags: Vec<TagStamp>,
        limits: &Limits,
        now: u64,
    ) -> Put {
        self.put(key, value, expires, tags, limits, now, true, None)
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn put(
        &self,
        key: &str,
        value: V,
        expires: u64,
        tags: Vec<TagStamp>,
        limits: &Limits,
        now: u64,
        only_new: bool,
        fill: Option<u64>,
    ) -> Put {
        if !all_current(&tags) {
            Stats::bump(&self.stats.invalidations, 1);
            return Put::Stale;
        }
        let weight = Self::weigh(key, &value, tags.len(), expires);
        if weight > MAX_WEIGHT || limits.max_bytes.is_some_and(|max| weight > max) {
            // Too large to ever fit: store nothing, and do not leave an older value behind.
            if !only_new || !self.contains(key, now) {
                self.delete(key, now);
                return Put::TooLarge;
            }
            return Put::Exists;
        }
        if only_new && self.contains(key, now) {
            return Put::Exists;
        }
        // The entry's block is built here, outside every lock (the value may let go of an object
        // whose release must not happen under one); an entry not stored is dropped after
        // unlocking.
        let entry = Entry::new(key, value, expires, tags);
        debug_assert_eq!(Self::charge(&entry), weight);
        // The room its refs will take in its tags' member lists goes on the books first, so
        // that the reservation evicts for it too (charged after the insert, it would leave the
        // store over MAX_BYTES until the next one). An entry already expired is not stored.
        let room = expires > now && self.make_room(entry.tags()) > 0;
        let put = if self.policy == Policy::Lru {
            self.put_lru(key, entry, limits, now, only_new, weight, fill)
        } else {
            self.put_s3(key, entry, limits, now, only_new, weight, fill)
        };
        if room && put != Put::Stored {
            // Room made for an insert that stored nothing (under S3-FIFO, before it reserved
            // anything): it stays, ready for the next ref, and is evicted for now.
            self.fit(limits, now, self.locate(key).1);
        }
        put
    }

    /// `put` under "lru": Django's cull at `max_entries`, then a reservation of its bytes.
    #[allow(clippy::too_many_arguments)]
    fn put_lru(
        &self,
        key: &str,
        entry: Entry<V>,
        limits: &Limits,
        now: u64,
        only_new: bool,
        weight: u64,
        fill: Option<u64>,
    ) -> Put {
        let expires = entry.expires();
        // An entry already expired is not stored: nothing to reserve (nor evict) for it.
        let weight = if expires > now { weight } else { 0 };
        let (hash, idx) = self.locate(key);
        if self.len() as i64 >= limits.max_entries {
            if self.shards.len() == 1 || limits.cull_frequency == 0 {
                self.cull(limits, now);
            } else {
                self.evict_for_entry(limits, now, idx);
            }
        }
        if !self.reserve(weight, limits, now, idx) {
            // Even an empty store cannot take it besides what its tags hold: too large.
            drop(entry);
            if !only_new || !self.contains(key, now) {
                self.delete(key, now);
                return Put::TooLarge;
            }
            return Put::Exists;
        }
        let mut shard = self.write(idx);
        if !self.fill_take(idx, key, fill, now) {
            // A fill whose placeholder a removal, write or flush of the key took away.
            drop(shard);
            self.bytes.fetch_sub(weight, Relaxed);
            return Put::Stale;
        }
        if let Lookup::Live(slot) = self.lookup(&mut shard, hash, key, now) {
            if only_new {
                drop(shard);
                self.bytes.fetch_sub(weight, Relaxed);
                return Put::Exists;
            }
            let e = self.detach(&mut shard, slot);
            shard.bury(e);
        }
        Stats::bump(&self.stats.sets, 1);
        if expires <= now {
            // Django stores an already-expired entry; nobody can ever read it, so store nothing.
            drop(shard);
            self.bytes.fetch_sub(weight, Relaxed);
            return Put::Stored;
        }
        let gen = self.next_gen();
        let has_tags = !entry.tags().is_empty();
        let mut entry = entry;
        entry.set_gen(gen);
        let slot = shard.insert(entry, hash);
        self.len.fetch_add(1, Relaxed);
        self.finish_put(shard, idx, slot, gen, has_tags, limits, now);
        Put::Stored
    }

    /// After an insert: unlocks, sweeps the next shard, and records the entry under its tags
    /// (evicting for any growth of their member lists the reservation did not cover, see `fit`).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn finish_put(
        &self,
        shard: LockedShard<'_, V>,
        idx: usize,
        slot: u32,
        gen: u32,
        has_tags: bool,
        limits: &Limits,
        now: u64,
    ) {
        let stamps = has_tags.then(|| shard.entry(slot).tags().to_vec());
        drop(shard);
        self.sweep_next(now);
        if let Some(stamps) = stamps {
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

    /// Replaces the value of the entry under `key` if it is still the one `token` was taken of
    /// (by `snapshot`, see `Token`), keeping its expiry and tags.
    pub fn replace_if(
        &self,
        key: &str,
        token: Token,
        value: V,
        limits: &Limits,
        now: u64,
    ) -> Replace {
        let (hash, idx) = self.locate(key);
        let (stamps, expires, delta, old_charge) = {
            let shard = self.shards[idx].read();
            match shard.find(hash, key) {
                Some(slot) => {
                    let e = shard.entry(slot);
                    (e.tags().to_vec(), e.expires(), e.delta(), Self::charge(e))
                }
                None => return Replace::Missing,
            }
        };
        // The new entry is built outside the lock (the value may let go of an object), from the
        // old one's deadline, stamps and compute time; it takes the old one's place below.
        let mut new = Entry::new(key, value, expires, stamps);
        if delta != 0 {
            new = new.with_delta(delta);
        }
        let weight = Self::charge(&new);
        if weight > MAX_WEIGHT || limits.max_bytes.is_some_and(|max| weight > max) {
            return Replace::TooLarge;
        }
        self.make_room(new.tags());
        // Only the growth over the entry it replaces, whose bytes the swap gives back: a
        // reservation of the whole value in a full store evicted the policy's victim, which
        // may be this very entry (an incr then found its key missing).
        let growth = weight.saturating_sub(old_charge);
        if !self.reserve(growth, limits, now, idx) {
            return Replace::TooLarge;
        }
        let mut moved = None;
        let mut over = false;
        let mut new = Some(new);
        let mut shard = self.write(idx);
        self.fill_take(idx, key, None, now);
        let out = match self.lookup(&mut shard, hash, key, now) {
            Lookup::Live(slot) if token.matches(&shard, slot) => {
                let Some(mut entry) = new.take() else {
                    unreachable!("the new entry is placed once")
                };
                let old = shard.entry(slot);
                if (old.expires(), old.delta()) != (entry.expires(), entry.delta()) {
                    // Touched since it was read (the generation stays): keep the new deadline.
                    entry = entry.reshaped(old.expires(), old.delta(), None);
                }
                entry.take_place_of(old);
                let gen = self.next_gen();
                entry.set_gen(gen);
                moved = Some((slot, gen, entry.tags().to_vec()));
                let exact = Self::charge(&entry);
                let old = shard.swap(slot, entry);
                // The books move from the old charge to the exact new one; `growth` is on them.
                let (on, off) = (exact, Self::charge(&old) + growth);
                if on >= off {
                    self.bytes.fetch_add(on - off, Relaxed);
                    // More than was reserved only if the entry changed its charge since it was
                    // read (a touch): evicted for after unlocking, as for a tag's growth.
                    over = on > off;
                } else {
                    self.bytes.fetch_sub(off - on, Relaxed);
                }
                shard.bury(old);
                self.used(&mut shard, slot, hash);
                Replace::Done
            }
            Lookup::Live(_) => {
                self.bytes.fetch_sub(growth, Relaxed);
                Replace::Conflict
            }
            Lookup::Absent => {
                self.bytes.fetch_sub(growth, Relaxed);
                Replace::Missing
            }
        };
        drop(shard);
        drop(new);
        self.moved_on(idx, moved, limits, now);
        if over {
            self.fit(limits, now, idx);
        }
        out
    }

    /// Empties the store and forgets every tag.
    pub fn clear(&self) {
        let mut dead = Vec::new();
        self.clear_into(&mut dead);
        drop(dead);
    }

    /// `clear`, handing the removed entries to the caller (to drop where it can, see
    /// `near::Graveyard`) instead of dropping them.
    pub fn clear_into(&self, dead: &mut Vec<Entry<V>>) {
        let mut all = self.lock_all();
        for g in all.guard.iter_mut() {
            all.dead.extend(g.drain());
        }
        self.fill_clear();
        self.len.store(0, Relaxed);
        self.bytes.store(0, Relaxed);
        dead.append(&mut all.unlock());
        self.tags.reset();
    }
}

// Under `shuttle` the store's primitives work only inside a shuttle run: see the models.
#[cfg(all(test, not(feature = "shuttle")))]
mod tests {
    use super::*;
    use crate::clock::NEVER;
    use crate::shard::Queue;
    use crate::store::testing::*;

    #[test]
    fn s3_delete_replace_and_tags_keep_the_queues_sound() {
        let store = s3(2);
        let lim = limits(50, None);
        let tagged = |k: &str, tag: &str| {
            let stamps = store.tags.stamps([tag]);
            store.set(k, Val(1), NEVER, stamps, &lim, 1)
        };
        for i in 0..40 {
            tagged(&format!("k{i}"), if i % 2 == 0 { "even" } else { "odd" });
        }
        assert_eq!(store.invalidate_tags(["even"], 1), 20);
        assert_eq!(store.len(), 20);
        assert!(store.get("k0", 1, |_| ()).is_none());
        assert!(store.delete("k1", 1));
        assert!(!store.delete("k1", 1));
        // Overwriting a live key keeps one entry and counts as a use.
        set(&store, "k3", 7, &lim, 1);
        assert_eq!(store.get("k3", 1, |v| v.0), Some(7));
        assert_eq!(store.len(), 19);
        for i in 0..500 {
            set(&store, &format!("n{i}"), 1, &lim, 1);
            assert!(store.len() <= 50);
        }
        assert_eq!(held(&store), store.len());
        for s in store.shards.iter() {
            let s = s.read();
            let q = |q| s.iter().filter(|e| e.queue() == q).count();
            assert_eq!(q(Queue::Small), s.queue_len(Queue::Small));
            assert_eq!(q(Queue::Main), s.queue_len(Queue::Main));
        }
        store.clear();
        assert_eq!((store.len(), held(&store), store.bytes()), (0, 0, 0));
    }

    #[test]
    fn replace_if_keeps_deadline_tags_and_compute_time_and_the_books_exact() {
        let store: Store<Val> = Store::new(1);
        let lim = limits(100, None);
        let stamps = store.tags.stamps(["t"]);
        store.set("k", Val(10), 50 * SEC, stamps, &lim, 1);
        assert!(store.set_delta("k", 50 * SEC, 3_000, &lim, 1));
        let (_, gen) = store.snapshot("k", 1, |e| e.value().0).unwrap();
        // A touch in between keeps the generation: the new value takes the newest deadline.
        assert!(store.touch("k", 80 * SEC, &lim, 1));
        assert_eq!(store.replace_if("k", gen, Val(500), &lim, 1), Replace::Done);
        let got = store.get_entry("k", 1, |e| {
            (e.value().0, e.expires(), e.delta(), e.tags().len())
        });
        assert_eq!(got, Some((500, 80 * SEC, 3_000, 1)));
        let sum: u64 = store.shards[0].read().iter().map(Store::charge).sum();
        assert_eq!(store.bytes(), sum + store.tags.bytes());
        // The old generation no longer matches.
        assert_eq!(
            store.replace_if("k", gen, Val(1), &lim, 1),
            Replace::Conflict
        );
        assert_eq!(
            store.replace_if("nope", gen, Val(1), &lim, 1),
            Replace::Missing
        );
        assert_eq!(store.invalidate_tags(["t"], 1), 1);
        assert_eq!(store.bytes(), 0);
    }

    #[test]
    fn replace_if_in_a_store_full_to_max_bytes_does_not_evict_the_entry_it_replaces() {
        // An incr of a float (snapshot, then replace_if) of the least recently used key of a
        // store full to MAX_BYTES: the value it replaces gives its bytes back, so a value of the
        // same size needs no room. Reserving the whole new value evicted the policy's victim,
        // the key itself, and the incr found it missing.
        for policy in [Policy::Lru, Policy::S3Fifo, Policy::TinyLfu] {
            let store: Store<Val> = Store::with_policy(1, policy);
            let per = Store::<Val>::weigh("k00", &Val(100), 0, NEVER) as usize;
            let lim = limits(1_000, Some((10 * per + per / 2) as u64));
            for i in 0..10 {
                assert_eq!(set(&store, &format!("k{i:02}"), 100, &lim, 1), Put::Stored);
            }
            // (W-TinyLFU's sketch takes a share of the bytes: fewer entries fit, 8 with a small
            // shard's sketch of four counter words a key.)
            let full = store.len();
            assert!(full >= 8, "{policy:?}: {full}");
            let before = store.stats.snapshot().evictions;
            let held: Vec<String> = (0..10)
                .map(|i| format!("k{i:02}"))
                .filter(|k| store.contains(k, 1))
                .collect();
            for key in held {
                let (_, token) = store.snapshot(&key, 1, |e| e.value().0).unwrap();
                assert_eq!(
                    store.replace_if(&key, token, Val(100), &lim, 1),
                    Replace::Done,
                    "{policy:?} {key}"
                );
            }
            assert_eq!(store.stats.snapshot().evictions, before, "{policy:?}");
            assert_eq!((store.len(), store.bytes()), (full, books(&store)));
            // A larger value still makes its room, within the bound, books exact (the eviction is
            // a write to the shard: a first try is a conflict, as for incr, which reads again;
            // the victim may be the key itself, as for any insert that needs room).
            let mut tries = 0;
            let got = loop {
                let (_, token) = store.snapshot("k09", 1, |e| e.value().0).unwrap();
                tries += 1;
                match store.replace_if("k09", token, Val(100 + per), &lim, 1) {
                    Replace::Conflict if tries < 3 => {}
                    Replace::Done => break Some(100 + per),
                    Replace::Missing => break None,
                    other => panic!("{policy:?}: {other:?} after {tries} tries"),
                }
            };
            assert!(store.stats.snapshot().evictions > before, "{policy:?}");
            assert!(store.bytes() <= lim.max_bytes.unwrap());
            assert_eq!(store.bytes(), books(&store), "{policy:?}");
            assert_eq!(store.get("k09", 1, |v| v.0), got, "{policy:?}");
        }
    }

    #[test]
    fn replace_if_refuses_after_any_replacement_even_at_the_same_slot() {
        for policy in [Policy::Lru, Policy::S3Fifo, Policy::TinyLfu] {
            for tagged in [false, true] {
                let store: Store<Val> = Store::with_policy(1, policy);
                let lim = limits(100, None);
                let put = |k: &str, w: usize| {
                    let stamps = if tagged {
                        store.tags.stamps(["t"])
                    } else {
                        Vec::new()
                    };
                    store.set(k, Val(w), NEVER, stamps, &lim, 1)
                };
                let token_of = |k| store.snapshot(k, 1, |e| e.value().0).unwrap().1;
                let slot_of = |k| store.shards[0].read().find(store.locate(k).0, k);
                put(":1:k", 10);
                put("k", 10);
                let why = format!("{policy:?} tagged {tagged}");
                assert!(matches!(token_of(":1:k"), Token::Tagged(_)) == tagged);
                // Deleted and stored again (the same size): the freed slot is reused.
                let token = token_of(":1:k");
                let slot = slot_of(":1:k");
                assert!(store.delete(":1:k", 1));
                put(":1:k", 10);
                assert_eq!(slot_of(":1:k"), slot, "{why}");
                assert_eq!(
                    store.replace_if(":1:k", token, Val(1), &lim, 1),
                    Replace::Conflict,
                    "{why}"
                );
                // Overwritten in its place, changed in place, replaced.
                let token = token_of(":1:k");
                put(":1:k", 30);
                assert_eq!(
                    store.replace_if(":1:k", token, Val(1), &lim, 1),
                    Replace::Conflict,
                    "{why}"
                );
                let token = token_of(":1:k");
                assert_eq!(store.update(":1:k", &lim, 1, |_| Some(())), Ok(Some(())));
                assert_eq!(
                    store.replace_if(":1:k", token, Val(1), &lim, 1),
                    Replace::Conflict,
                    "{why}"
                );
                let token = token_of(":1:k");
                assert_eq!(
                    store.replace_if(":1:k", token, Val(40), &lim, 1),
                    Replace::Done,
                    "{why}"
                );
                assert_eq!(
                    store.replace_if(":1:k", token, Val(1), &lim, 1),
                    Replace::Conflict,
                    "{why}"
                );
                // The key that differs only by the elided prefix was left alone all along.
                let token = token_of("k");
                assert_eq!(
                    store.replace_if("k", token, Val(50), &lim, 1),
                    Replace::Done
                );
                let get = |k| store.get_entry(k, 1, |e| e.value().0);
                assert_eq!((get(":1:k"), get("k")), (Some(40), Some(50)), "{why}");
                if policy == Policy::Lru {
                    // (The other policies charge their ghost or sketch too.)
                    let sum: u64 = store.shards[0].read().iter().map(Store::charge).sum();
                    assert_eq!(store.bytes(), sum + store.tags.bytes(), "{why}");
                }
            }
        }
    }

    #[test]
    fn replace_if_refuses_an_untagged_entry_whose_block_address_was_reused() {
        for policy in [Policy::Lru, Policy::S3Fifo, Policy::TinyLfu] {
            let store: Store<Val> = Store::with_policy(1, policy);
            let lim = limits(100, None);
            set(&store, "k", 10, &lim, 1);
            let (_, token) = store.snapshot("k", 1, |e| e.value().0).unwrap();
            let Token::Untagged { block, .. } = token else {
                panic!("an untagged entry has no generation")
            };
            // Delete and store the key again (the same size) until the allocator hands the
            // entry's old address to the new block: the same slot, the same address, another
            // value.
            let mut reused = false;
            for w in 11..10_000 {
                assert!(store.delete("k", 1));
                set(&store, "k", w, &lim, 1);
                if store.get_entry("k", 1, |e| e.addr()) == Some(block) {
                    reused = true;
                    break;
                }
            }
            assert!(reused, "{policy:?}: the allocator never reused the address");
            let (now_token, w) = store
                .snapshot("k", 1, |e| e.value().0)
                .map(|(w, t)| (t, w))
                .unwrap();
            assert!(matches!(now_token, Token::Untagged { block: b, .. } if b == block));
            assert_eq!(
                store.replace_if("k", token, Val(1), &lim, 1),
                Replace::Conflict,
                "{policy:?}: took the entry at a reused address for the one read"
            );
            assert_eq!(store.get_entry("k", 1, |e| e.value().0), Some(w));
        }
    }

    #[test]
    fn replace_if_of_an_untagged_entry_survives_reads_and_touches_not_other_writes() {
        let store: Store<Val> = Store::new(1);
        let lim = limits(100, None);
        set(&store, "k", 10, &lim, 1);
        let (_, token) = store.snapshot("k", 1, |e| e.value().0).unwrap();
        // Reads and a new deadline (which keeps the block and the value) leave it the same.
        assert_eq!(store.get("k", 1, |v| v.0), Some(10));
        assert!(store.touch("k", 80 * SEC, &lim, 1));
        assert_eq!(
            store.replace_if("k", token, Val(20), &lim, 1),
            Replace::Done
        );
        // Any write to the shard may have reused the block: a conflict, read again.
        let (_, token) = store.snapshot("k", 1, |e| e.value().0).unwrap();
        set(&store, "other", 10, &lim, 1);
        assert_eq!(
            store.replace_if("k", token, Val(30), &lim, 1),
            Replace::Conflict
        );
        let (_, token) = store.snapshot("k", 1, |e| e.value().0).unwrap();
        assert_eq!(
            store.replace_if("k", token, Val(30), &lim, 1),
            Replace::Done
        );
        assert_eq!(store.get("k", 1, |v| v.0), Some(30));
        // A flush and a new entry under the key in between: a conflict.
        let (_, token) = store.snapshot("k", 1, |e| e.value().0).unwrap();
        store.clear();
        set(&store, "k", 30, &lim, 1);
        assert_eq!(
            store.replace_if("k", token, Val(40), &lim, 1),
            Replace::Conflict
        );
    }

    #[test]
    fn keys_that_differ_only_by_the_elided_prefix_are_distinct_entries() {
        let near = [
            "", ":1:", ":1", ":", ":10:abc", "abc", ":1:abc", ":1:1:abc", "1:abc",
        ];
        for policy in [Policy::Lru, Policy::S3Fifo, Policy::TinyLfu] {
            let store: Store<Val> = Store::with_policy(4, policy);
            let lim = limits(100_000, None);
            for (i, k) in near.iter().enumerate() {
                assert_eq!(set(&store, k, i, &lim, 1), Put::Stored);
            }
            // Enough others (made and not) that every shard's table grows a few times.
            for i in 0..4_000 {
                set(&store, &format!(":1:other:{i}"), 1_000, &lim, 1);
                set(&store, &format!("other:{i}"), 2_000, &lim, 1);
            }
            for (i, k) in near.iter().enumerate() {
                assert_eq!(store.get_entry(k, 1, |e| e.value().0), Some(i), "{k:?}");
            }
            let mut listed = store.keys_with_prefix(":1:", 1);
            listed.retain(|k| !k.contains("other"));
            listed.sort();
            assert_eq!(listed, [":1:", ":1:1:abc", ":1:abc"]);
            let mut listed = store.keys_with_prefix("", 1);
            listed.retain(|k| !k.contains("other"));
            listed.sort();
            let mut all = near.map(String::from).to_vec();
            all.sort();
            assert_eq!(listed, all);
            assert_eq!(store.keys_with_prefix(":1", 1).len(), 4_000 + 5);
            assert_eq!(store.keys_with_prefix(":1:o", 1).len(), 4_000);
            assert_eq!(store.keys_with_prefix(":10", 1), [":10:abc"]);
            // Deleting by prefix (as `delete_pattern` does: list, then delete each).
            for k in store.keys_with_prefix(":1:a", 1) {
                assert!(store.delete(&k, 1));
            }
            assert!(!store.delete(":1:abc", 1));
            for (i, k) in near.iter().enumerate() {
                let want = (*k != ":1:abc").then_some(i);
                assert_eq!(store.get_entry(k, 1, |e| e.value().0), want, "{k:?}");
            }
            for k in near {
                assert_eq!(store.delete(k, 1), k != ":1:abc", "{k:?}");
            }
            assert_eq!(store.len(), 8_000);
            if policy == Policy::Lru {
                let sum: u64 = (0..4)
                    .map(|i| {
                        store.shards[i]
                            .read()
                            .iter()
                            .map(Store::charge)
                            .sum::<u64>()
                    })
                    .sum();
                assert_eq!(store.bytes(), sum);
            }
        }
    }
}

/// Shards under shuttle's scheduler (`crate::sync`): threads writing, deleting, reading and
/// incrementing a few keys of a store of two shards, under both policies, in thousands of
/// seeded, replayable interleavings. Run: `cargo test --no-default-features --features shuttle
/// store::`.
#[cfg(all(test, feature = "shuttle"))]
mod shuttle_tests {
    use super::*;
    use crate::clock::NEVER;
    use crate::store::testing::model::{books, check, Num, Tally};
    use crate::store::testing::*;
    use crate::sync::scope;

    const ITERATIONS: usize = 3_000;

    /// Adds one to `key` the way `incr` does for a value it cannot change in place: read it with
    /// its generation, store the sum only if the entry is still that one, else read again.
    fn incr_by_snapshot(store: &Store<Num>, tally: &Tally, key: &str) {
        loop {
            let (n, gen) = store.snapshot(key, 1, |e| e.value().n).expect("present");
            let lim = limits(100, None);
            match store.replace_if(key, gen, tally.num(n + 1, 8), &lim, 1) {
                Replace::Done => return,
                Replace::Conflict => continue,
                other => panic!("{other:?}"),
            }
        }
    }

    /// Adds one to `key` in place (`incr` of an integer).
    fn incr_in_place(store: &Store<Num>, key: &str) {
        let done = store.update(key, &limits(100, None), 1, |v| {
            v.n += 1;
            Some(())
        });
        assert_eq!(done, Ok(Some(())));
    }

    /// Every read returns a value some write stored under that key; no increment is lost; at
    /// the end each key holds its last write, the count, the books and the counters agree with
    /// what was done, and `clear` drops every value exactly once.
    fn shards(policy: Policy) {
        let tally = Tally::default();
        let store: Store<Num> = Store::with_policy(2, policy);
        let lim = limits(100, None);
        let set = |key, n| {
            let put = store.set(key, tally.num(n, 8), NEVER, Vec::new(), &lim, 1);
            assert_eq!(put, Put::Stored);
        };
        set("c", 0);
        scope(|s| {
            s.spawn(|| {
                set("a", 1);
                set("b", 2);
                assert!(store.delete("a", 1), "a was stored by this thread");
                set("a", 3);
            });
            s.spawn(|| {
                let got = store.get("a", 1, |v| v.n);
                assert!(matches!(got, None | Some(1 | 3)), "a read {got:?}");
                incr_in_place(&store, "c");
                set("b", 5);
                let got = store.get("b", 1, |v| v.n);
                assert!(matches!(got, Some(2 | 5)), "b read {got:?}");
                incr_in_place(&store, "c");
            });
            s.spawn(|| {
                incr_by_snapshot(&store, &tally, "c");
                incr_by_snapshot(&store, &tally, "c");
            });
        });
        let got = ["a", "b", "c"].map(|k| store.get(k, 1, |v| v.n));
        assert!(
            matches!(got, [Some(3), Some(2 | 5), Some(4)]),
            "lost or stale entries: {got:?}"
        );
        assert_eq!((store.len(), held(&store)), (3, 3));
        assert_eq!(store.bytes(), books(&store));
        let s = store.stats.snapshot();
        assert_eq!((s.sets, s.deletes, s.hits + s.misses), (5, 1, 2 + 3));
        assert_eq!(tally.alive(), 3, "only the stored values are left");
        store.clear();
        assert_eq!((store.len(), store.bytes(), tally.alive()), (0, 0, 0));
    }

    #[test]
    fn lru_shards_lose_no_write_and_no_increment() {
        check(ITERATIONS, || shards(Policy::Lru));
    }

    #[test]
    fn s3_shards_lose_no_write_and_no_increment() {
        check(ITERATIONS, || shards(Policy::S3Fifo));
    }
}
