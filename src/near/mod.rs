//! NearCache's Rust half: keeps a process's L1 store coherent with Redis/Valkey.
//!
//! - `resp.rs`: RESP3 parsing and command encoding, on bytes.
//! - `listener.rs`: the thread on its own connection: BCAST tracking (or pub/sub), heartbeats.
//! - `lease.rs`: until when L1 may serve a hit.
//! - `record.rs`: when the listener applied invalidations (CLOCK_MONOTONIC), for `stats()` and
//!   the delivery benchmark.
//! - this file: `Near`, one listener and lease for one L1 store, started lazily and again in a
//!   forked child (which must not serve what it inherited), and `Sink`, what the listener
//!   applies invalidations to (the store itself, see `store/fill.rs`: removing a key also
//!   cancels the fill placeholder of that key).
//!
//! Pure Rust (no PyO3): `cargo test --no-default-features` runs it all, against a scripted
//! server and a real `redis-server`.

pub mod inherited;
pub mod lease;
pub mod listener;
pub mod record;
pub mod resp;
pub mod sentinel;
pub mod tls;

use std::sync::atomic::Ordering::{AcqRel, Acquire, Relaxed};
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;

use crate::fork;
// The graveyard's head, from `crate::sync` so that its model runs under shuttle; the listener
// itself (a thread on a socket, real clocks) keeps `std` and `parking_lot`.
use crate::store::{Store, Weigh};
use crate::sync::atomic::AtomicPtr;
use lease::Lease;
use listener::{Config, Counters, Running, Switch};

/// What invalidations are applied to. Called on the listener thread, with no lock of its own
/// held; must not block for long and must not call into Python.
pub trait Sink: Send + Sync {
    /// The key (a made key: `prefix:version:key`) changed in Redis: drop it and cancel its fill.
    fn invalidate(&self, key: &str);
    /// Everything may have changed: drop it all (and every fill in progress).
    fn flush(&self);
}

impl<V: Weigh + Send + Sync> Sink for Store<V> {
    fn invalidate(&self, key: &str) {
        self.invalidate_key(key);
    }

    fn flush(&self) {
        self.clear();
    }
}

/// Values the listener removed, waiting for a thread that may drop them (for Python objects: one
/// holding the GIL, so that the decref, and any `__del__`, runs there and not on the listener).
///
/// A lock-free stack of batches: `bury` links a batch with one compare-and-swap and `take` unlinks
/// them all with one swap, so a fork at any instant leaves a consistent stack in the child (a
/// batch being linked at that instant is simply not in it) and no lock that could be inherited
/// held. (PyO3's own queue for decrefs made without the GIL is a mutex the listener would hold
/// while pushing: a fork at that instant would leave it locked in the child.)
pub struct Graveyard<T> {
    head: AtomicPtr<Grave<T>>,
}

struct Grave<T> {
    items: Vec<T>,
    next: *mut Grave<T>,
}

// SAFETY: the stack owns its batches; items cross threads only as a whole batch, handed from the
// thread that buries to the one that takes (as a `Mutex<Vec<T>>` would hand them).
unsafe impl<T: Send> Send for Graveyard<T> {}
unsafe impl<T: Send> Sync for Graveyard<T> {}

impl<T> Default for Graveyard<T> {
    fn default() -> Self {
        Graveyard {
            head: AtomicPtr::new(std::ptr::null_mut()),
        }
    }
}

impl<T> Graveyard<T> {
    /// Hands `items` over (nothing happens for none).
    pub fn bury(&self, items: Vec<T>) {
        if items.is_empty() {
            return;
        }
        let grave = Box::into_raw(Box::new(Grave {
            items,
            next: std::ptr::null_mut(),
        }));
        let mut head = self.head.load(Acquire);
        loop {
            // SAFETY: `grave` is ours until the exchange below publishes it.
            unsafe { (*grave).next = head };
            match self
                .head
                .compare_exchange_weak(head, grave, AcqRel, Acquire)
            {
                Ok(_) => return,
                Err(now) => head = now,
            }
        }
    }

    /// Whether nothing waits (one relaxed load: for hot paths).
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.head.load(Relaxed).is_null()
    }

    /// Everything buried so far, for the caller to drop.
    pub fn take(&self) -> Vec<T> {
        let mut out = Vec::new();
        let mut p = self.head.swap(std::ptr::null_mut(), AcqRel);
        while !p.is_null() {
            // SAFETY: the swap made this chain ours alone; each grave was made by `Box::new`.
            let grave = unsafe { Box::from_raw(p) };
            p = grave.next;
            out.extend(grave.items);
        }
        out
    }
}

impl<T> Drop for Graveyard<T> {
    fn drop(&mut self) {
        drop(self.take());
    }
}

/// A snapshot of a listener's state for `stats()`.
#[derive(Clone, Debug, PartialEq)]
pub struct NearStats {
    pub invalidations: u64,
    pub flushes: u64,
    pub reconnects: u64,
    pub connected: bool,
    pub lease_ok: bool,
    pub last_pong_rtt_ms: Option<f64>,
    pub last_error: Option<String>,
    /// CLOCK_MONOTONIC ns when the listener last applied an invalidation (of a key).
    pub last_invalidation_ns: Option<u64>,
    /// Write start → applied by this process's listener, ns, for the last invalidation of one
    /// of this process's own noted writes (`note_writes`).
    pub last_lag_ns: Option<u64>,
    /// How many such lags were measured.
    pub lag_samples: u64,
    /// Behind Sentinel: master switches (`+switch-master`) the watcher acted on.
    pub master_switches: u64,
    /// Behind Sentinel: the sentinel whose `+switch-master` the watcher is subscribed to.
    pub watching: Option<(String, u16)>,
    /// Behind Sentinel: why the watcher's last subscription failed or ended.
    pub watch_error: Option<String>,
}

/// The invalidation listener and lease of one L1 store.
pub struct Near {
    config: Mutex<Config>,
    sink: Arc<dyn Sink>,
    lease: Arc<Lease>,
    counters: Arc<Counters>,
    /// The listener and the fork generation it was started in.
    running: Mutex<Option<(Running, u64)>>,
    /// The fork generation + 1 in which the listener runs (0: none), for a lock-free
    /// `ensure_started` on the hot path.
    started: AtomicU64,
}

impl Near {
    pub fn new(config: Config, sink: Arc<dyn Sink>) -> Self {
        Near {
            config: Mutex::new(config),
            sink,
            lease: Arc::new(Lease::new()),
            counters: Arc::new(Counters::default()),
            running: Mutex::new(None),
            started: AtomicU64::new(0),
        }
    }

    pub fn config(&self) -> Config {
        self.config.lock().clone()
    }

    /// Starts the listener unless it runs in this process already (cheap then: one atomic
    /// load). In a forked child the parent's listener is forgotten and a new one started, which
    /// flushes L1 before the lease can be fresh again. Also restarts a listener whose thread
    /// ended (it never should).
    pub fn ensure_started(&self) -> std::io::Result<()> {
        let gen = fork::generation();
        if self.started.load(SeqCst) == gen + 1 {
            return Ok(());
        }
        let mut running = self.running.lock();
        match running.take() {
            Some((r, g)) if g != gen => r.abandon(),
            Some((r, g)) if !r.is_finished() => {
                *running = Some((r, g));
                self.started.store(gen + 1, SeqCst);
                return Ok(());
            }
            Some((r, _)) => r.stop(),
            None => {}
        }
        self.lease.revoke();
        // In a forked child: the record inherited from the parent is forgotten first.
        self.counters.record.renew();
        let r = Running::start(
            self.config(),
            self.sink.clone(),
            self.lease.clone(),
            self.counters.clone(),
        )?;
        *running = Some((r, gen));
        self.started.store(gen + 1, SeqCst);
        Ok(())
    }

    /// L1 may serve a hit now.
    #[inline]
    pub fn fresh(&self) -> bool {
        self.lease.fresh()
    }

    /// `fresh` at clock time `now` (a caller that reads the clock anyway passes its reading).
    #[inline]
    pub fn fresh_at(&self, now: u64) -> bool {
        self.lease.fresh_at(now)
    }

    /// Waits until `fresh` (or `timeout`); blocks: call it without the GIL.
    pub fn wait_fresh(&self, timeout: Duration) -> bool {
        self.lease.wait_fresh(timeout)
    }

    /// Takes the listener out (ending the lease) for the caller to `stop` it, which may wait:
    /// the caller can release the GIL for that. In a forked child it is abandoned instead.
    pub fn take_running(&self) -> Option<Running> {
        let taken = self.running.lock().take();
        self.started.store(0, SeqCst);
        self.lease.revoke();
        match taken {
            Some((r, g)) if g == fork::generation() => {
                r.signal_stop();
                Some(r)
            }
            Some((r, _)) => {
                r.abandon();
                None
            }
            None => None,
        }
    }

    /// Stops the listener and ends the lease (waits for the thread).
    pub fn close(&self) {
        if let Some(r) = self.take_running() {
            r.stop();
        }
        self.lease.revoke();
    }

    /// Replaces the configuration; a running listener is taken out (to be stopped by the
    /// caller) and the next `ensure_started` starts one with the new settings.
    pub fn reconfigure(&self, config: Config) -> Option<Running> {
        let mut current = self.config.lock();
        if *current == config {
            return None;
        }
        *current = config;
        drop(current);
        self.take_running()
    }

    /// This process is about to send writes of `keys` (made keys): when the listener applies
    /// the first invalidation of one of them, write start → applied is `stats().last_lag_ns`.
    pub fn note_writes<'a>(&self, keys: impl IntoIterator<Item = &'a str>) {
        let now = record::monotonic_ns();
        for k in keys {
            self.counters.record.wrote(k.as_bytes(), now);
        }
    }

    /// CLOCK_MONOTONIC ns when this process's listener last applied an invalidation of `key` (a
    /// made key), if its record still holds it (a direct-mapped table of 1024 slots).
    pub fn applied_ns(&self, key: &str) -> Option<u64> {
        self.counters.record.applied_ns(key.as_bytes())
    }

    pub fn stats(&self) -> NearStats {
        let c = &self.counters;
        let gen = fork::generation();
        let (connected, last_error, (watching, watch_error)) = match &*self.running.lock() {
            Some((r, g)) if *g == gen => (
                c.connected.load(SeqCst),
                r.shared.last_error(),
                r.shared.watch_state(),
            ),
            _ => (false, None, (None, None)),
        };
        let rtt = c.last_pong_rtt_ns.load(SeqCst);
        NearStats {
            invalidations: c.invalidations.load(SeqCst),
            flushes: c.flushes.load(SeqCst),
            reconnects: c.reconnects.load(SeqCst),
            connected,
            lease_ok: self.fresh(),
            last_pong_rtt_ms: (rtt > 0).then(|| rtt as f64 / 1e6),
            last_error,
            last_invalidation_ns: c.record.last_applied(),
            last_lag_ns: c.record.last_lag().map(|(ns, _)| ns),
            lag_samples: c.record.last_lag().map_or(0, |(_, n)| n),
            master_switches: c.switches.load(SeqCst),
            watching,
            watch_error,
        }
    }

    /// Behind Sentinel: the last master switch this process's listener acted on (None: none,
    /// or none since a fork).
    pub fn last_switch(&self) -> Option<Switch> {
        match &*self.running.lock() {
            Some((r, g)) if *g == fork::generation() => r.shared.last_switch(),
            _ => None,
        }
    }
}

impl Drop for Near {
    fn drop(&mut self) {
        if let Some(r) = self.take_running() {
            r.signal_stop();
        }
    }
}

// Under `shuttle` the store's primitives work only inside a shuttle run: see the models.
#[cfg(all(test, not(feature = "shuttle")))]
mod tests;

/// The graveyard under shuttle's scheduler: threads burying batches while another takes them, in
/// thousands of seeded, replayable interleavings. Run: `cargo test --no-default-features
/// --features shuttle near::`.
#[cfg(all(test, feature = "shuttle"))]
mod shuttle_tests {
    use super::Graveyard;
    use crate::sync::scope;

    /// Every item buried comes out of `take` exactly once, whoever takes it and when.
    fn bury_and_take() {
        let g = Graveyard::<u32>::default();
        let mut out = scope(|s| {
            s.spawn(|| {
                g.bury(vec![1, 2]);
                g.bury(vec![3]);
            });
            s.spawn(|| {
                g.bury(vec![4]);
                g.bury(Vec::new());
                g.bury(vec![5, 6]);
            });
            let taker = s.spawn(|| {
                let mut out = g.take();
                out.extend(g.take());
                out
            });
            taker.join().unwrap()
        });
        out.extend(g.take());
        out.sort_unstable();
        assert_eq!(out, [1, 2, 3, 4, 5, 6], "an item lost or taken twice");
        assert!(g.is_empty());
    }

    #[test]
    fn every_buried_item_is_taken_exactly_once() {
        let mut config = shuttle::Config::new();
        config.silence_warnings = true;
        let random = shuttle::scheduler::RandomScheduler::new(3_000);
        shuttle::Runner::new(random, config.clone()).run(bury_and_take);
        let pct = shuttle::scheduler::PctScheduler::new(3, 3_000);
        shuttle::Runner::new(pct, config).run(bury_and_take);
    }
}
