//! When the listener applied invalidations, on `CLOCK_MONOTONIC`, for `stats()` and benchmarks.
//!
//! `CLOCK_MONOTONIC` is system-wide on Linux (Python's `time.monotonic_ns()` reads it too), so a
//! writer process can subtract its own timestamp from a receiver's apply time: that difference
//! is the delivery lag, measured where delivery ends (the Rust listener, which needs no GIL), not
//! where some Python thread of the receiver gets around to noticing it.
//!
//! Kept:
//! - `applied`: a table, direct-mapped by key hash, of (key hash, when applied): "when did this
//!   process's listener last apply an invalidation of key K" (`Near::applied_ns`); a later key
//!   with the same slot overwrites an earlier one, so an answer is for K or nothing.
//! - `written`: the same kind of table of this process's own writes (`Near::note_writes`, noted
//!   by NearCache just before it sends a write). When the listener applies the first
//!   invalidation of a noted key, write start → applied is the exact end-to-end lag of that
//!   write reaching this process's own listener (`last_lag_ns`), and the note is consumed.
//! - the time of the last applied invalidation.
//!
//! Atomics only (each slot a seqlock whose data are atomics too): the listener never takes a
//! lock here, and a fork at any instant leaves nothing locked in the child. A slot being written
//! at the fork may stay "busy" in the child, which is why a record belongs to one fork
//! generation: in a child it reads empty until `renew` clears it, which `Near::ensure_started`
//! does before it starts the child's own listener.

use std::sync::atomic::{AtomicU64, Ordering::SeqCst};

use crate::fork;

/// `CLOCK_MONOTONIC` now, in nanoseconds (the clock of Python's `time.monotonic_ns()` on Linux).
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC always exists on the
    // platforms we build for, and the call has no other precondition.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    if rc != 0 {
        return 0;
    }
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64)
}

/// FNV-1a of the key, never 0 (0 marks an empty slot). The same in every process.
pub fn key_hash(key: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in key {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h.max(1)
}

/// One (hash, ns) pair behind a sequence number: odd while a writer is in it.
#[derive(Default)]
struct Slot {
    seq: AtomicU64,
    hash: AtomicU64,
    ns: AtomicU64,
}

impl Slot {
    /// Writes (hash, ns) unless another writer is in the slot (then this write is dropped: a
    /// record, not a ledger). `expect` (a sequence number) makes it conditional on the slot not
    /// having changed since it was read.
    fn write(&self, hash: u64, ns: u64, expect: Option<u64>) -> bool {
        let s = self.seq.load(SeqCst);
        if s & 1 == 1 || expect.is_some_and(|e| e != s) {
            return false;
        }
        if self.seq.compare_exchange(s, s + 1, SeqCst, SeqCst).is_err() {
            return false;
        }
        self.hash.store(hash, SeqCst);
        self.ns.store(ns, SeqCst);
        self.seq.store(s + 2, SeqCst);
        true
    }

    /// (sequence, hash, ns), consistent, or `None` if a writer is in it.
    fn read(&self) -> Option<(u64, u64, u64)> {
        for _ in 0..4 {
            let s1 = self.seq.load(SeqCst);
            if s1 & 1 == 1 {
                std::hint::spin_loop();
                continue;
            }
            let h = self.hash.load(SeqCst);
            let ns = self.ns.load(SeqCst);
            if self.seq.load(SeqCst) == s1 {
                return Some((s1, h, ns));
            }
        }
        None
    }

    fn clear(&self) {
        self.hash.store(0, SeqCst);
        self.ns.store(0, SeqCst);
        self.seq.store(0, SeqCst);
    }
}

fn table(n: usize) -> Box<[Slot]> {
    (0..n).map(|_| Slot::default()).collect()
}

const APPLIED: usize = 1024;
const WRITTEN: usize = 256;

/// See the module comment.
pub struct Record {
    /// The fork generation this record belongs to.
    generation: AtomicU64,
    applied: Box<[Slot]>,
    written: Box<[Slot]>,
    last_applied_ns: AtomicU64,
    last_lag_ns: AtomicU64,
    lag_samples: AtomicU64,
}

impl Default for Record {
    fn default() -> Self {
        Record {
            generation: AtomicU64::new(fork::generation()),
            applied: table(APPLIED),
            written: table(WRITTEN),
            last_applied_ns: AtomicU64::new(0),
            last_lag_ns: AtomicU64::new(0),
            lag_samples: AtomicU64::new(0),
        }
    }
}

impl std::fmt::Debug for Record {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Record")
            .field("last_applied_ns", &self.last_applied())
            .field("last_lag_ns", &self.last_lag())
            .finish_non_exhaustive()
    }
}

impl Record {
    /// It holds this process's data (not a parent's, inherited at a fork).
    fn current(&self) -> bool {
        self.generation.load(SeqCst) == fork::generation()
    }

    /// In a forked child, before its own listener starts: forget the parent's record.
    pub fn renew(&self) {
        let gen = fork::generation();
        if self.generation.load(SeqCst) == gen {
            return;
        }
        for s in self.applied.iter().chain(self.written.iter()) {
            s.clear();
        }
        self.last_applied_ns.store(0, SeqCst);
        self.last_lag_ns.store(0, SeqCst);
        self.lag_samples.store(0, SeqCst);
        self.generation.store(gen, SeqCst);
    }

    /// This process is about to send a write of `key` (at `ns`).
    pub fn wrote(&self, key: &[u8], ns: u64) {
        if !self.current() {
            return;
        }
        let h = key_hash(key);
        self.written[(h % WRITTEN as u64) as usize].write(h, ns, None);
    }

    /// The listener applied an invalidation of `key` at `ns`.
    pub fn applied(&self, key: &[u8], ns: u64) {
        if !self.current() {
            return;
        }
        let h = key_hash(key);
        self.applied[(h % APPLIED as u64) as usize].write(h, ns, None);
        self.last_applied_ns.store(ns, SeqCst);
        let w = &self.written[(h % WRITTEN as u64) as usize];
        if let Some((seq, wh, wns)) = w.read() {
            // Consume the note (only if nobody rewrote it meanwhile), then count its lag.
            if wh == h && wns <= ns && w.write(0, 0, Some(seq)) {
                self.last_lag_ns.store(ns - wns, SeqCst);
                self.lag_samples.fetch_add(1, SeqCst);
            }
        }
    }

    /// When the listener last applied an invalidation of `key` (if the table still holds it).
    pub fn applied_ns(&self, key: &[u8]) -> Option<u64> {
        if !self.current() {
            return None;
        }
        let h = key_hash(key);
        match self.applied[(h % APPLIED as u64) as usize].read() {
            Some((_, sh, ns)) if sh == h && ns > 0 => Some(ns),
            _ => None,
        }
    }

    /// When the listener last applied any invalidation.
    pub fn last_applied(&self) -> Option<u64> {
        let ns = self.last_applied_ns.load(SeqCst);
        (self.current() && ns > 0).then_some(ns)
    }

    /// Write start → applied by this process's listener, for the last invalidation of one of
    /// this process's own noted writes; and how many such lags were measured.
    pub fn last_lag(&self) -> Option<(u64, u64)> {
        let n = self.lag_samples.load(SeqCst);
        (self.current() && n > 0).then(|| (self.last_lag_ns.load(SeqCst), n))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_is_stable_and_never_zero() {
        assert_eq!(key_hash(b"a"), key_hash(b"a"));
        assert_ne!(key_hash(b"a"), key_hash(b"b"));
        assert_ne!(key_hash(b""), 0);
    }

    #[test]
    fn clock_moves_forward() {
        let a = monotonic_ns();
        let b = monotonic_ns();
        assert!(a > 0 && b >= a);
    }

    #[test]
    fn applied_by_key_and_last() {
        let r = Record::default();
        assert_eq!(r.applied_ns(b"k"), None);
        assert_eq!(r.last_applied(), None);
        r.applied(b"k", 100);
        r.applied(b"j", 200);
        assert_eq!(r.applied_ns(b"k"), Some(100));
        assert_eq!(r.applied_ns(b"j"), Some(200));
        assert_eq!(r.applied_ns(b"x"), None);
        assert_eq!(r.last_applied(), Some(200));
        r.applied(b"k", 300);
        assert_eq!(r.applied_ns(b"k"), Some(300));
    }

    #[test]
    fn own_write_lag_is_measured_once() {
        let r = Record::default();
        r.applied(b"k", 50);
        assert_eq!(r.last_lag(), None, "no write was noted");
        r.wrote(b"k", 1_000);
        r.applied(b"other", 1_100);
        assert_eq!(r.last_lag(), None);
        r.applied(b"k", 1_250);
        assert_eq!(r.last_lag(), Some((250, 1)));
        // A second invalidation of k (someone else's write) does not count against the note.
        r.applied(b"k", 9_000);
        assert_eq!(r.last_lag(), Some((250, 1)));
        // An invalidation older than the note (queued before the write) is not its lag.
        r.wrote(b"k", 10_000);
        r.applied(b"k", 9_999);
        assert_eq!(r.last_lag(), Some((250, 1)));
        r.applied(b"k", 10_400);
        assert_eq!(r.last_lag(), Some((400, 2)));
    }

    #[test]
    fn busy_slot_reads_none_and_drops_writes() {
        let s = Slot::default();
        assert!(s.write(7, 8, None));
        let (seq, h, ns) = s.read().unwrap();
        assert_eq!((h, ns), (7, 8));
        // A writer stopped half-way (as at a fork): readers and writers leave it alone.
        s.seq.store(seq + 1, SeqCst);
        assert_eq!(s.read(), None);
        assert!(!s.write(1, 2, None));
        s.clear();
        assert_eq!(s.read(), Some((0, 0, 0)));
        // A conditional write fails once the slot changed.
        assert!(s.write(3, 4, None));
        assert!(!s.write(5, 6, Some(0)));
    }

    #[test]
    fn another_generation_reads_empty_until_renewed() {
        let r = Record::default();
        r.applied(b"k", 100);
        r.wrote(b"j", 5);
        // As if inherited from the parent at a fork.
        r.generation
            .store(fork::generation().wrapping_add(1), SeqCst);
        assert_eq!(r.applied_ns(b"k"), None);
        assert_eq!(r.last_applied(), None);
        r.applied(b"k", 200); // ignored until renewed
        r.renew();
        assert_eq!(r.applied_ns(b"k"), None);
        assert_eq!(r.last_applied(), None);
        r.applied(b"j", 300);
        assert_eq!(r.last_lag(), None, "the parent's write note is gone");
        assert_eq!(r.applied_ns(b"j"), Some(300));
    }
}
