//! Reads: `get` (under S3-FIFO a hit needs only the read lock), `snapshot`, `contains`, `expiry`
//! and the prefix scan.

use super::*;

impl<V: Weigh> Store<V> {
    /// Calls `read` on the live value under `key` and counts the use for the policy.
    #[inline]
    pub fn get<R>(&self, key: &str, now: u64, read: impl FnOnce(&V) -> R) -> Option<R> {
        self.get_entry(key, now, |e| read(e.value()))
    }

    /// Like `get`, but `read` sees the whole live entry (its expiry and recorded compute time, for
    /// early refresh), not only the value.
    #[inline]
    pub fn get_entry<R>(
        &self,
        key: &str,
        now: u64,
        read: impl FnOnce(&Entry<V>) -> R,
    ) -> Option<R> {
        match self.policy {
            Policy::Lru => {
                let (hash, idx) = self.locate(key);
                self.get_locked(hash, idx, key, now, read)
            }
            Policy::S3Fifo | Policy::TinyLfu => self.get_s3(key, now, read),
        }
    }

    /// `get` under the write lock: removes a dead entry under `key` and counts a hit for the
    /// policy (`used`). "lru" always reads this way. It leaves other expired entries to the
    /// sweep that writes drive (`reclaim`): a read checks no other entry's deadline.
    pub(super) fn get_locked<R>(
        &self,
        hash: u64,
        idx: usize,
        key: &str,
        now: u64,
        read: impl FnOnce(&Entry<V>) -> R,
    ) -> Option<R> {
        let mut shard = self.write(idx);
        let out = match self.lookup(&mut shard, hash, key, now) {
            Lookup::Live(slot) => {
                self.used(&mut shard, slot, hash);
                Stats::bump(&self.stats.hits, 1);
                Some(read(shard.entry(slot)))
            }
            Lookup::Absent => {
                Stats::bump(&self.stats.misses, 1);
                None
            }
        };
        drop(shard);
        out
    }

    /// `get` under S3-FIFO and W-TinyLFU. A live hit and a miss need only the read lock (a hit
    /// bumps the entry's counter, and W-TinyLFU's sketch); only a dead entry under `key` (expired,
    /// or a tag invalidated) takes the write lock, to remove it. Other expired entries of the
    /// shard play no part: the sweep reclaims them.
    pub(super) fn get_s3<R>(
        &self,
        key: &str,
        now: u64,
        read: impl FnOnce(&Entry<V>) -> R,
    ) -> Option<R> {
        let (hash, idx) = self.locate(key);
        {
            let shard = self.shards[idx].read();
            let Some(slot) = shard.find(hash, key) else {
                Stats::bump(&self.stats.misses, 1);
                return None;
            };
            let e = shard.entry(slot);
            if !e.is_expired(now) && all_current(e.tags()) {
                if self.policy == Policy::TinyLfu {
                    shard.tiny_hit(slot, hash);
                } else {
                    e.hit();
                }
                Stats::bump(&self.stats.hits, 1);
                return Some(read(e));
            }
        }
        self.get_locked(hash, idx, key, now, read)
    }

    /// Like `get_entry` but also returns a token of the entry (see `Token`), for a later
    /// `replace_if`.
    pub fn snapshot<R>(
        &self,
        key: &str,
        now: u64,
        read: impl FnOnce(&Entry<V>) -> R,
    ) -> Option<(R, Token)> {
        let (hash, idx) = self.locate(key);
        let mut shard = self.write(idx);
        let out = match self.lookup(&mut shard, hash, key, now) {
            Lookup::Live(slot) => Some((read(shard.entry(slot)), Token::of(&shard, slot))),
            Lookup::Absent => None,
        };
        drop(shard);
        out
    }

    /// Whether a live entry exists; does not change recency (as LocMemCache's `has_key`).
    pub fn contains(&self, key: &str, now: u64) -> bool {
        let (hash, idx) = self.locate(key);
        let mut shard = self.write(idx);
        let out = matches!(self.lookup(&mut shard, hash, key, now), Lookup::Live(_));
        drop(shard);
        out
    }

    /// Seconds-stamp of the live entry's expiry (`Some(NEVER)` for none), `None` if missing.
    pub fn expiry(&self, key: &str, now: u64) -> Option<u64> {
        let (hash, idx) = self.locate(key);
        let mut shard = self.write(idx);
        let out = match self.lookup(&mut shard, hash, key, now) {
            Lookup::Live(slot) => Some(shard.entry(slot).expires()),
            Lookup::Absent => None,
        };
        drop(shard);
        out
    }

    /// Live keys whose text starts with `prefix` (a scan of the store: for pattern operations).
    pub fn keys_with_prefix(&self, prefix: &str, now: u64) -> Vec<String> {
        let mut out = Vec::new();
        for s in self.shards.iter() {
            let shard = s.read();
            out.extend(
                shard
                    .iter()
                    .filter(|e| {
                        !e.is_expired(now) && all_current(e.tags()) && e.key().starts_with(prefix)
                    })
                    .map(|e| e.key().to_string()),
            );
        }
        out
    }
}

// Under `shuttle` the store's primitives work only inside a shuttle run: see the models.
#[cfg(all(test, not(feature = "shuttle")))]
mod tests {
    use std::sync::mpsc;
    use std::sync::Arc;
    use std::thread;
    use std::time::Duration;

    use super::*;
    use crate::store::testing::*;

    /// Whether `get` of a present key completes while another thread holds its shard's read lock.
    fn get_completes_beside_a_reader(store: Arc<Store<Val>>) -> bool {
        let lim = limits(100, None);
        set(&store, "k", 1, &lim, 1);
        hit_beside_a_reader(store, 1)
    }

    /// Whether `get` of "k" at `now` hits while another thread holds its shard's read lock.
    fn hit_beside_a_reader(store: Arc<Store<Val>>, now: u64) -> bool {
        let idx = store.locate("k").1;
        let guard = store.shards[idx].read();
        let (tx, rx) = mpsc::channel();
        let s = store.clone();
        let t = thread::spawn(move || tx.send(s.get("k", now, |v| v.0)).unwrap());
        let got = rx.recv_timeout(Duration::from_millis(300));
        drop(guard);
        t.join().unwrap();
        got == Ok(Some(1))
    }

    #[test]
    fn a_hit_needs_no_write_lock_when_another_entry_of_its_shard_has_expired() {
        for policy in [Policy::S3Fifo, Policy::TinyLfu] {
            let store = Arc::new(Store::with_policy(1, policy));
            let lim = limits(100, None);
            store.set("old", Val(2), 5 * SEC, Vec::new(), &lim, 1);
            store.set("k", Val(1), NEVER, Vec::new(), &lim, 1);
            assert!(hit_beside_a_reader(store.clone(), 10 * SEC), "{policy:?}");
            // The expired entry is left to the sweep (writes), and never served.
            assert_eq!(store.len(), 2);
            assert_eq!(store.get("old", 10 * SEC, |v| v.0), None);
            assert_eq!(store.len(), 1);
        }
    }

    #[test]
    fn s3_hit_needs_only_a_read_lock_lru_hit_the_write_lock() {
        assert!(get_completes_beside_a_reader(Arc::new(s3(4))));
        assert!(get_completes_beside_a_reader(Arc::new(Store::with_policy(
            4,
            Policy::TinyLfu
        ))));
        assert!(!get_completes_beside_a_reader(Arc::new(Store::new(4))));
    }

    #[test]
    fn s3_expired_hit_takes_the_write_path_and_removes_it() {
        let store = s3(1);
        let lim = limits(100, None);
        store.set("short", Val(1), 50 * SEC, Vec::new(), &lim, 1);
        assert_eq!(store.get("short", 10 * SEC, |v| v.0), Some(1));
        assert_eq!(store.get("short", 60 * SEC, |v| v.0), None);
        assert_eq!(store.len(), 0);
        assert_eq!(store.stats.snapshot().expirations, 1);
    }
}
