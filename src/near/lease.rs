//! The lease: until when L1 may serve a hit, in the crate's monotonic clock (`clock.rs`).
//!
//! The listener sends a PING at `t0` on its connection; when the PONG is processed (after every
//! push that came before it on the socket, since a socket is read in order), every invalidation
//! the server queued before it read the PING has been applied, so L1 may serve until
//! `t0 + LEASE`. A disconnect, a `close` or a fork ends it.
//!
//! Lock-free on purpose: the lease is read on every L1 hit, and a mutex here could be inherited
//! locked by a forked child. A *term* tells extensions from an ended listener session apart from
//! those of the current one: `revoke` moves the term on, and an extension made for an older term
//! is undone. The fork generation (`fork.rs`) the lease was started in is part of `fresh`, so a
//! child never serves from a lease it inherited.

use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::time::Duration;

use crate::clock;
use crate::fork;

#[derive(Debug, Default)]
pub struct Lease {
    /// Clock nanoseconds until which L1 may serve; 0 when off.
    until: AtomicU64,
    /// Moved on by every `revoke`; `extend` only counts for the term it was given.
    term: AtomicU64,
    /// The fork generation the current term was started in.
    gen: AtomicU64,
}

impl Lease {
    pub fn new() -> Self {
        let lease = Lease::default();
        lease.gen.store(fork::generation(), SeqCst);
        lease
    }

    /// L1 may serve a hit now.
    #[inline]
    pub fn fresh(&self) -> bool {
        self.fresh_at(clock::now())
    }

    #[inline]
    pub fn fresh_at(&self, now: u64) -> bool {
        now < self.until.load(SeqCst) && self.gen.load(SeqCst) == fork::generation()
    }

    /// Clock nanoseconds until which the lease runs (0: off).
    pub fn until(&self) -> u64 {
        self.until.load(SeqCst)
    }

    /// Ends the lease and every term before: returns the new term, for a new session to extend.
    /// Also adopts the current fork generation (a child's new listener starts a lease of its own).
    pub fn revoke(&self) -> u64 {
        let term = self.term.fetch_add(1, SeqCst) + 1;
        self.until.store(0, SeqCst);
        self.gen.store(fork::generation(), SeqCst);
        term
    }

    /// The term now (for a session that starts without revoking first).
    pub fn term(&self) -> u64 {
        self.term.load(SeqCst)
    }

    /// A PING sent at `sent` (clock ns) was answered: L1 may serve until `sent + lease`, if
    /// `term` is still the current one. Never moves the deadline back within a term.
    pub fn extend(&self, term: u64, sent: u64, lease: Duration) {
        if self.term.load(SeqCst) != term {
            return;
        }
        let until = sent.saturating_add(lease.as_nanos().min(u64::MAX as u128) as u64);
        self.until.fetch_max(until, SeqCst);
        if self.term.load(SeqCst) != term {
            // A revoke ran in between: it may have zeroed before our store; zero again.
            self.until.store(0, SeqCst);
        }
    }

    /// Waits (sleeping, in small steps) until the lease is fresh or `timeout` passes.
    pub fn wait_fresh(&self, timeout: Duration) -> bool {
        let start = std::time::Instant::now();
        loop {
            if self.fresh() {
                return true;
            }
            let spent = start.elapsed();
            if spent >= timeout {
                return false;
            }
            std::thread::sleep((timeout - spent).min(Duration::from_millis(2)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    #[test]
    fn a_pong_makes_the_lease_run_from_the_pings_send_time() {
        let lease = Lease::new();
        assert!(!lease.fresh_at(1));
        let term = lease.revoke();
        lease.extend(term, 100 * MS, Duration::from_millis(500));
        assert!(lease.fresh_at(100 * MS));
        assert!(lease.fresh_at(599 * MS));
        assert!(!lease.fresh_at(600 * MS));
        // An older PONG processed late never shortens it.
        lease.extend(term, 50 * MS, Duration::from_millis(500));
        assert_eq!(lease.until(), 600 * MS);
    }

    #[test]
    fn revoke_ends_the_lease_and_an_old_terms_extension_counts_for_nothing() {
        let lease = Lease::new();
        let old = lease.revoke();
        lease.extend(old, 100 * MS, Duration::from_millis(500));
        let new = lease.revoke();
        assert!(!lease.fresh_at(200 * MS));
        lease.extend(old, 150 * MS, Duration::from_millis(500));
        assert!(
            !lease.fresh_at(200 * MS),
            "a finished session extended the lease"
        );
        lease.extend(new, 150 * MS, Duration::from_millis(500));
        assert!(lease.fresh_at(200 * MS));
    }

    #[test]
    fn wait_fresh_returns_false_after_the_timeout_and_true_once_extended() {
        let lease = std::sync::Arc::new(Lease::new());
        assert!(!lease.wait_fresh(Duration::from_millis(20)));
        let term = lease.revoke();
        let l = lease.clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            l.extend(term, clock::now(), Duration::from_secs(5));
        });
        assert!(lease.wait_fresh(Duration::from_secs(10)));
        t.join().unwrap();
    }
}
